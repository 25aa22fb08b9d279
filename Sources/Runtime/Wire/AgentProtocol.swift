/// What the host and the guest agent agree on beyond the messages of agent.proto: the
/// forms a forwarded Task API request takes when the host rewrote it for the guest.
public enum AgentProtocol {
    /// A rootfs mount's source naming a disk the host hot-plugged: the rest is the disk's
    /// virtio-blk serial, which the agent finds under /sys/block/vd*/serial.
    public static let diskSourceScheme = "virtio-blk-serial:"
    /// In the share's root: the guest image's on-demand kernel modules (read-only,
    /// `<release>/modules.dep` and the .ko files), which the agent loads on first use.
    public static let modulesDirectory = ".modules"
}

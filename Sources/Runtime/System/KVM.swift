#if canImport(Glibc)
import Glibc
#endif
import CShims

/// Whether this host's KVM really runs guests.
public enum KVMProbe {
    /// Runs a few bytes of real-mode code under KVM in a forked child (deadline
    /// `timeoutMS`): true when it reached its marker; the text says what passed or failed.
    public static func run(timeoutMS: Int32 = 2000) -> (ran: Bool, detail: String) {
        var buf = [CChar](repeating: 0, count: 256)
        let ran = ks_kvm_probe(timeoutMS, &buf, buf.count) == 1
        return (ran, String(decoding: buf.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self))
    }

    /// A para-virtualised KVM (PVM: the host is a guest itself) runs only guest kernels
    /// built for it, though it passes the real-mode probe.
    public static var isPVM: Bool { access("/sys/module/kvm_pvm", F_OK) == 0 }
}

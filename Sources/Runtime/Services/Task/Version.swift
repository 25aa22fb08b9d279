/// The release, as Connect, Check, `kuasar info` and the logs report it.
public enum KuasarVersion {
    public static let string = "0.1.0"
}

use which::which;

/// Rebuild when bpf-linker changes: it is the linker of this crate, but cargo
/// does not track linkers.
fn main() {
    if let Ok(linker) = which("bpf-linker") {
        println!("cargo:rerun-if-changed={}", linker.display());
    }
}

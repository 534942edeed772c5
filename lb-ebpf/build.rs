//! Rebuild the programs when bpf-linker changes: the link step depends on it, and cargo
//! cannot know that on its own.
fn main() {
    if let Ok(linker) = which::which("bpf-linker") {
        println!("cargo:rerun-if-changed={}", linker.display());
    }
}

// bpf-linker is a build tool of this crate; rerun when it is rebuilt so a new linker relinks.
fn main() {
    if let Ok(linker) = which::which("bpf-linker") {
        println!("cargo:rerun-if-changed={}", linker.display());
    }
}

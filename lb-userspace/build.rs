//! Builds the XDP programs in `lb-ebpf` for the BPF target (nightly, `-Z build-std=core`,
//! bpf-linker with BTF) and leaves the object in `OUT_DIR/lb-ebpf`, which `dataplane` embeds.
use anyhow::{Context as _, anyhow};
use cargo_metadata::{Metadata, MetadataCommand, Package};

fn main() -> anyhow::Result<()> {
    let Metadata { packages, .. } = MetadataCommand::new()
        .no_deps()
        .exec()
        .context("cargo metadata")?;
    let Package {
        name,
        manifest_path,
        ..
    } = packages
        .into_iter()
        .find(|p| p.name.as_str() == "lb-ebpf")
        .ok_or_else(|| anyhow!("package lb-ebpf not found in the workspace"))?;
    let root_dir = manifest_path
        .parent()
        .ok_or_else(|| anyhow!("{manifest_path} has no parent"))?;
    aya_build::build_ebpf(
        [aya_build::Package {
            name: name.as_str(),
            root_dir: root_dir.as_str(),
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
}

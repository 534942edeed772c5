//! `cargo xtask bench xdp --katran DIR`: builds Katran's XDP balancer (`balancer.bpf.o`) from a
//! checkout of facebookincubator/katran at DIR, with Katran's own build flags, so the XDP
//! benchmark can measure it beside `lb_xdp` in the same run. Katran's source stays outside this
//! repository (it is GPL-2.0); only the object, under `target/katran/`, is produced.
//!
//! The flags are those of Katran's `build_bpf_modules_opensource.sh` and `katran/lib/Makefile-bpf`:
//! the script copies `katran/lib/linux_includes/*` into an `include/` directory and runs
//! `clang -I include -I . $(EXTRA_CFLAGS) -DDEBUG -D__KERNEL__ -Wno-unused-value
//! -Wno-pointer-sign -Wno-compare-distinct-pointer-types -O2 -emit-llvm -c -g FILE -o - |
//! llc -march=bpf -filetype=obj`, with no extra defines by default (so `RING_SIZE` 65537,
//! `MAX_VIPS` 512, `MAX_CONN_RATE` 125000, IPIP encapsulation: `balancer_consts.h`). The only
//! difference: the bitcode goes through a file instead of a pipe.
use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail, ensure};

/// The compiler and the BPF back end: Debian's clang-22 (installed when missing) and the
/// llc of the LLVM 22 the build already needs.
const CLANG: &str = "clang-22";
const LLC: &str = "/usr/lib/llvm-22/bin/llc";
const CLANG_PACKAGE: &str = "clang-22";

/// Katran's balancer source, relative to its checkout.
const SOURCE: &str = "katran/lib/bpf/balancer.bpf.c";
const LINUX_INCLUDES: &str = "katran/lib/linux_includes";

/// The two commands (program, arguments) that build `out/balancer.bpf.o` from the checkout
/// `src`, with `out/include` staged as Katran's build script does.
pub fn commands(src: &Path, out: &Path) -> [(String, Vec<String>); 2] {
    let p = |p: &Path| p.display().to_string();
    let bitcode = out.join("balancer.bpf.bc");
    let clang = [
        format!("-I{}", p(&out.join("include"))),
        format!("-I{}", p(src)),
        "-DDEBUG".into(),
        "-D__KERNEL__".into(),
        "-Wno-unused-value".into(),
        "-Wno-pointer-sign".into(),
        "-Wno-compare-distinct-pointer-types".into(),
        "-O2".into(),
        "-emit-llvm".into(),
        "-c".into(),
        "-g".into(),
        p(&src.join(SOURCE)),
        "-o".into(),
        p(&bitcode),
    ];
    let llc = [
        "-march=bpf".into(),
        "-filetype=obj".into(),
        "-o".into(),
        p(&out.join("balancer.bpf.o")),
        p(&bitcode),
    ];
    [(CLANG.into(), clang.to_vec()), (LLC.into(), llc.to_vec())]
}

fn have(cmd: &str) -> bool {
    Command::new(cmd)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Installs clang from Debian when it is missing (as the L7 benchmark installs its peers).
fn ensure_clang() -> anyhow::Result<()> {
    if have(CLANG) {
        return Ok(());
    }
    eprintln!("xtask: installing {CLANG_PACKAGE} (apt-get), to build Katran's BPF object");
    let ok = Command::new("sh")
        .args([
            "-c",
            &format!(
                "apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
                 --no-install-recommends {CLANG_PACKAGE}"
            ),
        ])
        .status()
        .context("running apt-get")?
        .success();
    ensure!(ok, "installing {CLANG_PACKAGE} failed");
    Ok(())
}

/// Builds `balancer.bpf.o` from the Katran checkout `src` into `out` (created); returns its
/// path.
pub fn build(src: &Path, out: &Path) -> anyhow::Result<PathBuf> {
    let src = src
        .canonicalize()
        .with_context(|| format!("--katran {}", src.display()))?;
    ensure!(
        src.join(SOURCE).is_file() && src.join(LINUX_INCLUDES).is_dir(),
        "--katran {}: not a Katran checkout (no {SOURCE} or {LINUX_INCLUDES})",
        src.display()
    );
    ensure_clang()?;
    let include = out.join("include");
    std::fs::create_dir_all(&include).with_context(|| format!("creating {}", include.display()))?;
    let headers = src.join(LINUX_INCLUDES);
    for entry in
        std::fs::read_dir(&headers).with_context(|| format!("reading {}", headers.display()))?
    {
        let path = entry?.path();
        if path.is_file()
            && let Some(name) = path.file_name()
        {
            std::fs::copy(&path, include.join(name))
                .with_context(|| format!("copying {}", path.display()))?;
        }
    }
    if let Ok(o) = Command::new("git")
        .args(["-C", &src.display().to_string(), "rev-parse", "HEAD"])
        .output()
        && o.status.success()
    {
        eprintln!(
            "xtask: Katran commit {}",
            String::from_utf8_lossy(&o.stdout).trim()
        );
    }
    for (program, args) in commands(&src, out) {
        eprintln!("xtask: {program} {}", args.join(" "));
        let status = Command::new(&program)
            .args(&args)
            .status()
            .with_context(|| format!("running {program}"))?;
        if !status.success() {
            bail!("building Katran's balancer: {program} failed ({status})");
        }
    }
    Ok(out.join("balancer.bpf.o"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_use_katrans_flags_and_chain_clang_into_llc() {
        let [(clang, c), (llc, l)] = commands(Path::new("/k"), Path::new("/o"));
        assert_eq!(clang, CLANG);
        assert_eq!(llc, LLC);
        for flag in [
            "-I/o/include",
            "-I/k",
            "-DDEBUG",
            "-D__KERNEL__",
            "-O2",
            "-emit-llvm",
            "-g",
        ] {
            assert!(c.iter().any(|a| a == flag), "clang lacks {flag}: {c:?}");
        }
        assert!(c.iter().any(|a| a == "/k/katran/lib/bpf/balancer.bpf.c"));
        // No define of Katran's own: its defaults (balancer_consts.h) are what it ships.
        assert!(
            !c.iter()
                .any(|a| a.starts_with("-D") && a != "-DDEBUG" && a != "-D__KERNEL__")
        );
        // llc reads what clang wrote and emits a BPF object.
        let bitcode = c.last().unwrap();
        assert_eq!(l.last().unwrap(), bitcode);
        assert!(l.iter().any(|a| a == "-march=bpf"));
        assert!(
            l.windows(2)
                .any(|w| w[0] == "-o" && w[1] == "/o/balancer.bpf.o")
        );
    }
}

//! Benchmark support (`cargo xtask bench xdp`): the front program that restores the intended
//! frame before every repeat of a live-frames `BPF_PROG_TEST_RUN` and tail-calls the program
//! measured, the two floors, and the sink on the veth peer. `lb run` never uses any of it.
use std::time::Duration;

use aya::{
    Ebpf,
    maps::{Array, PerCpuArray, ProgramArray},
    programs::{TestRun as _, TestRunAttrs, TestRunOptions, Xdp},
};
use lb_common::{BenchCounter, BenchTemplate, names};

use super::{
    Balancer, DataplaneError, Decap, Result, Sizes, attach_named, load_object, loaded_xdp, map_err,
    xdp_program,
};
use crate::cli::XdpMode;

pub mod katran;

/// The program the front tail-calls.
#[derive(Clone, Copy)]
pub enum BenchTarget<'a> {
    /// `lb_bench_tx`: swaps the Ethernet addresses, returns `XDP_TX`.
    TxFloor,
    /// `lb_pass`: returns `XDP_PASS`.
    PassFloor,
    /// `lb_xdp` of this balancer (its own maps).
    Balancer(&'a Balancer),
    /// `lb_decap` of this decapsulator.
    Decap(&'a Decap),
    /// Katran's `balancer_ingress` (`cargo xtask bench xdp --katran DIR`).
    Katran(&'a katran::Katran),
}

/// `lb_bench_front` and the floors, loaded; the sink attached once [`BenchFront::attach_sink`]
/// is called (detached when this drops).
pub struct BenchFront {
    ebpf: Ebpf,
}

impl BenchFront {
    /// Loads the front program, both floors and the sink (nothing attached).
    pub fn load() -> Result<Self> {
        let mut ebpf = load_object(Sizes::MINIMAL, None)?;
        for name in [
            names::PROG_BENCH_FRONT,
            names::PROG_BENCH_TX,
            names::PROG_PASS,
            names::PROG_BENCH_SINK,
        ] {
            xdp_program(&mut ebpf, name)?;
        }
        Ok(Self { ebpf })
    }

    /// Attaches `lb_bench_sink` to `iface` (native mode): the veth peer of the interface the
    /// test runs on, so that transmitted frames are really sent, counted and dropped.
    pub fn attach_sink(&mut self, iface: &str) -> Result<()> {
        attach_named(
            &mut self.ebpf,
            names::PROG_BENCH_SINK,
            iface,
            XdpMode::Native,
        )
    }

    /// Writes the frame the front program restores before every repeat.
    pub fn set_template(&mut self, template: &BenchTemplate) -> Result<()> {
        let mut map: Array<_, BenchTemplate> = self
            .ebpf
            .map_mut(names::MAP_BENCH_TEMPLATE)
            .ok_or_else(|| missing_map(names::MAP_BENCH_TEMPLATE))?
            .try_into()
            .map_err(map_err("LB_BENCH_TEMPLATE has an unexpected type"))?;
        map.set(0, template, 0)
            .map_err(map_err("writing LB_BENCH_TEMPLATE"))
    }

    /// Makes `target` the program the front tail-calls.
    pub fn set_target(&mut self, target: BenchTarget<'_>) -> Result<()> {
        let fd = match target {
            BenchTarget::TxFloor => program_fd(&self.ebpf, names::PROG_BENCH_TX)?,
            BenchTarget::PassFloor => program_fd(&self.ebpf, names::PROG_PASS)?,
            BenchTarget::Balancer(b) => program_fd(&b.ebpf, names::PROG_XDP)?,
            BenchTarget::Decap(d) => program_fd(&d.ebpf, names::PROG_DECAP)?,
            BenchTarget::Katran(k) => k.program_fd()?,
        };
        let fd = fd.try_clone().map_err(|source| DataplaneError::Io {
            what: "duplicating the descriptor of",
            path: "the benchmarked program".into(),
            source,
        })?;
        let mut progs: ProgramArray<_> = self
            .ebpf
            .map_mut(names::MAP_BENCH_PROGS)
            .ok_or_else(|| missing_map(names::MAP_BENCH_PROGS))?
            .try_into()
            .map_err(map_err("LB_BENCH_PROGS has an unexpected type"))?;
        progs
            .set(0, &fd, 0)
            .map_err(map_err("writing LB_BENCH_PROGS"))
    }

    /// One live-frames test run of the front program: `repeat` frames of `frame.len()` bytes
    /// (the template's length; `frame` is their initial content) received on interface
    /// `ifindex`, in batches of `batch`. What the programs return really happens: `XDP_TX`
    /// and `XDP_REDIRECT` transmit, `XDP_PASS` goes up the stack. Returns the kernel's
    /// average time per frame (whole nanoseconds).
    pub fn run_live(
        &self,
        frame: &[u8],
        ifindex: u32,
        repeat: u32,
        batch: u32,
    ) -> Result<Duration> {
        let prog = loaded_xdp(&self.ebpf, names::PROG_BENCH_FRONT)?;
        // struct xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index,
        // egress_ifindex (include/uapi/linux/bpf.h).
        let fields: [u32; 6] = [0, frame.len() as u32, 0, ifindex, 0, 0];
        let ctx: Vec<u8> = fields.iter().flat_map(|f| f.to_ne_bytes()).collect();
        let mut opts = TestRunOptions::new();
        opts.data_in = Some(frame);
        opts.ctx_in = Some(&ctx);
        opts.repeat = repeat;
        opts.attrs = TestRunAttrs::new().xdp_live_frames(batch);
        let res = prog
            .test_run(opts)
            .map_err(|source| DataplaneError::Program {
                what: format!(
                    "BPF_PROG_TEST_RUN (live frames) of {} on ifindex {ifindex}",
                    names::PROG_BENCH_FRONT
                ),
                source,
            })?;
        Ok(res.duration)
    }

    /// Sum over CPUs of one of the front's and the sink's counters.
    pub fn counter(&self, c: BenchCounter) -> Result<u64> {
        let map: PerCpuArray<_, u64> = self
            .ebpf
            .map(names::MAP_BENCH_STATS)
            .ok_or_else(|| missing_map(names::MAP_BENCH_STATS))?
            .try_into()
            .map_err(map_err("LB_BENCH_STATS has an unexpected type"))?;
        let v = map
            .get(&(c as u32), 0)
            .map_err(map_err("reading LB_BENCH_STATS"))?;
        Ok(v.iter().sum())
    }
}

fn missing_map(name: &'static str) -> DataplaneError {
    DataplaneError::Map {
        what: format!("finding {name}"),
        source: aya::maps::MapError::InvalidName { name: name.into() },
    }
}

fn program_fd<'a>(ebpf: &'a Ebpf, name: &str) -> Result<&'a aya::programs::ProgramFd> {
    let prog: &Xdp = loaded_xdp(ebpf, name)?;
    prog.fd().map_err(|source| DataplaneError::Program {
        what: format!("the descriptor of {name}"),
        source,
    })
}

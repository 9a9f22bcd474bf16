//! Launch planning of the CUDA kernels (`cuda.rs`): how the work of a prefill or a decode
//! step is cut into grids. Plain arithmetic, kept apart from the CUDA code so that CI,
//! which has no GPU and does not build the `cuda` feature, tests it.

/// Threads the scan aims to keep in flight (≈ 132 SMs × 2048 on an H100/H200): the time
/// axis is cut into chunks until batch × d_inner × chunks reaches this. Twice as many
/// (shorter) chunks measured 3.5% slower for 130m at 32K on an H100 (scripts/gpu-tune.sh):
/// more of the sequence is scanned twice, and the combine's serial chain is longer.
pub const SCAN_TARGET_THREADS: usize = 1 << 18;
/// Shortest chunk worth the extra summary pass of the chunked scan.
pub const SCAN_MIN_CHUNK: usize = 64;

/// Most sequences one fused decode step takes (`MAXB` in the kernels).
pub const MAX_DECODE_BATCH: usize = 8;
/// Shared memory a decode matvec may stage its f32 input rows in (the default limit
/// without opting in to more).
pub const DECODE_SMEM_BYTES: usize = 48 * 1024;

/// Largest grid extent in y and z.
pub const MAX_GRID_YZ: usize = 65_535;

/// How the chunked scan cuts `len` steps of `batch × d_inner` channels: `(n_chunks,
/// chunk_len)` with every chunk but the last full, `n_chunks · chunk_len ≥ len`, at most
/// ⌈len / [`SCAN_MIN_CHUNK`]⌉ chunks (so more than SCAN_MIN_CHUNK / 2 steps each), and no
/// more chunks than needed to fill the GPU. One chunk means a single pass from the initial
/// state.
pub fn scan_chunks(batch: usize, d_inner: usize, len: usize) -> (usize, usize) {
    scan_chunks_for(batch, d_inner, len, SCAN_TARGET_THREADS)
}

/// [`scan_chunks`] aiming at `target_threads` instead of [`SCAN_TARGET_THREADS`].
pub fn scan_chunks_for(
    batch: usize,
    d_inner: usize,
    len: usize,
    target_threads: usize,
) -> (usize, usize) {
    let pairs = (batch * d_inner).max(1);
    let want = target_threads.div_ceil(pairs).max(1);
    let n_chunks = want.min(len.div_ceil(SCAN_MIN_CHUNK)).clamp(1, MAX_GRID_YZ);
    let chunk_len = len.div_ceil(n_chunks).max(1);
    (len.div_ceil(chunk_len).max(1), chunk_len)
}

/// Which prefill scan runs (`DECIMAMBA_SCAN`): the chunked two-pass scan, or the
/// single-pass one (`scan_single` in cuda.kernels.cu) with its block shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScanKind {
    Chunked,
    Single(SingleScan),
}

/// The single-pass scan's block: `channels` warps, one per channel, each lane holding
/// `items` consecutive steps of a window of 32 · items.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SingleScan {
    pub channels: usize,
    pub items: usize,
}

impl SingleScan {
    /// 4 channels of 8 steps per lane (see [`SingleScan::smem_bytes`]).
    pub const DEFAULT: SingleScan = SingleScan {
        channels: 4,
        items: 8,
    };

    /// Floats of one lane's row in a tile (`SS_ROW` in the kernels): `items` when a multiple
    /// of 4 (plus 4 where that makes the row an even number of 16-byte units), else
    /// `items + 1`.
    pub fn row(&self) -> usize {
        match (self.items % 4, self.items % 8) {
            (0, 0) => self.items + 4,
            (0, _) => self.items,
            _ => self.items + 1,
        }
    }

    /// Bytes of the block's dynamic shared memory: B and C for every state, Δ and x for
    /// every channel, rows for 32 lanes, padded (`SS_BC_STRIDE`, `SS_CH_STRIDE`).
    pub fn smem_bytes(&self, d_state: usize) -> usize {
        let row = 32 * self.row();
        4 * (2 * d_state * (row + 4) + 2 * self.channels * (row + 8))
    }

    /// Whether this block's tiles fit a device that grants `max_smem` bytes per block.
    pub fn fits(&self, d_state: usize, max_smem: usize) -> bool {
        self.smem_bytes(d_state) <= max_smem
    }

    /// The grid: one block per `channels` adjacent channels, one grid layer per sequence.
    pub fn grid(&self, batch: usize, d_inner: usize) -> (usize, usize, usize) {
        (d_inner.div_ceil(self.channels), 1, batch)
    }
}

impl ScanKind {
    /// `chunked`, `single`, or `single:C:K` (C channels per block, K steps per lane).
    pub fn parse(name: &str, value: &str) -> Result<ScanKind, String> {
        let bad = |why: &str| format!("{name}={value:?}: {why}");
        let v = value.trim();
        if v == "chunked" {
            return Ok(ScanKind::Chunked);
        }
        if v == "single" {
            return Ok(ScanKind::Single(SingleScan::DEFAULT));
        }
        let Some(shape) = v.strip_prefix("single:") else {
            return Err(bad("expected chunked, single or single:CHANNELS:ITEMS"));
        };
        let parts: Vec<&str> = shape.split(':').collect();
        let [c, k] = parts[..] else {
            return Err(bad("expected single:CHANNELS:ITEMS"));
        };
        let number = |s: &str| s.parse::<usize>().map_err(|_| bad("not a number"));
        let (channels, items) = (number(c)?, number(k)?);
        if !(1..=32).contains(&channels) {
            return Err(bad("channels per block must be 1..=32 (one warp each)"));
        }
        if !(1..=32).contains(&items) {
            return Err(bad("steps per lane must be 1..=32"));
        }
        Ok(ScanKind::Single(SingleScan { channels, items }))
    }
}

/// Tokens per thread of the prefill conv: 32, more when `len / 32` tiles would exceed the
/// grid's y extent.
pub fn conv_tile(len: usize) -> usize {
    32.max(len.div_ceil(MAX_GRID_YZ))
}

/// Whether the fused decode step takes `batch` sequences of this width: its matvecs stage
/// `batch` input rows of up to max(d_model, d_inner) f32 in shared memory.
pub fn decode_fits(batch: usize, d_model: usize, d_inner: usize) -> bool {
    (1..=MAX_DECODE_BATCH).contains(&batch) && batch * d_model.max(d_inner) * 4 <= DECODE_SMEM_BYTES
}

/// Warps of a decode matvec block ([`DECODE_BLOCK_WARPS`] × 32 threads).
pub const DECODE_BLOCK_WARPS: usize = 8;
/// Warps a decode matvec aims to keep in flight: enough 16-byte loads outstanding to
/// stream the weights at HBM bandwidth (≈ 132 SMs × 32 warps on an H100/H200).
pub const DECODE_TARGET_WARPS: usize = 4096;
/// Blocks per SM a decode matvec launches at most (`DECIMAMBA_DECODE_BLOCKS_PER_SM`
/// overrides it; 0: no cap). 3: decode 1,574 → 1,806 tokens/s (130m bf16) and 242 → 291
/// (2.8b bf16) with MATVEC_PIPELINE on an H100, against 2 and 4 in the same run
/// (docs/gpu-benchmarks.md): fewer, longer-lived blocks stage their input once for
/// several row groups.
pub const DECODE_BLOCKS_PER_SM: usize = 3;
/// Blocks of the persistent decode step on `sms` SMs that each keep `resident` of its
/// blocks (the occupancy the driver reports), at most `per_sm_cap` per SM (0: no cap).
/// `None` when none can be resident: the per-stage kernels run instead. A cooperative
/// launch fails when it asks for more blocks than are resident, and its grid barriers
/// would wait forever on blocks that never start.
pub fn persistent_blocks(sms: usize, resident: usize, per_sm_cap: usize) -> Option<usize> {
    let per_sm = match per_sm_cap {
        0 => resident,
        cap => cap.min(resident),
    };
    (sms > 0 && per_sm > 0).then_some(sms * per_sm)
}

/// Fewest bytes of a row one warp's share should hold: one 16-byte load per lane.
pub const DECODE_MIN_SLICE_BYTES: usize = 32 * 16;

/// How many warps share one output row of a decode matvec with `n` rows of `k` elements
/// of `elem_bytes`: the smallest power of two up to [`DECODE_BLOCK_WARPS`] that puts
/// [`DECODE_TARGET_WARPS`] warps to work, without cutting a row into slices of fewer than
/// [`DECODE_MIN_SLICE_BYTES`]. The warps of a row sit in one block and add their partial
/// sums in a fixed order, so the result does not depend on the split's timing. A few
/// long rows (x_proj: 192 rows of 5,120 for 2.8b) need the split; one warp per row leaves
/// most SMs idle and each warp waiting on one load at a time.
pub fn decode_split(n: usize, k: usize, elem_bytes: usize) -> usize {
    let mut split = 1;
    while split < DECODE_BLOCK_WARPS
        && n * split < DECODE_TARGET_WARPS
        && (k * elem_bytes) / (2 * split) >= DECODE_MIN_SLICE_BYTES
    {
        split *= 2;
    }
    split
}

/// Blocks of a decode matvec with `n` rows, `split` warps per row: one per group of rows,
/// or, when that is more than `max_blocks` (0: no cap), as few as cover the groups in the
/// same number of rounds with every block doing that many or one fewer. A block stages
/// (and for in_proj normalises) its whole input row before its first product, so fewer,
/// longer-lived blocks pay that once for several groups, and the kernel's loads then
/// run from one row into the next (cuda.kernels.cu: matvec_rows).
pub fn decode_blocks(n: usize, split: usize, max_blocks: usize) -> usize {
    let rows_per_block = (DECODE_BLOCK_WARPS / split.clamp(1, DECODE_BLOCK_WARPS)).max(1);
    let groups = n.div_ceil(rows_per_block).max(1);
    if max_blocks == 0 || groups <= max_blocks {
        return groups;
    }
    groups.div_ceil(groups.div_ceil(max_blocks))
}

/// MiB of weights the decode step's L2 prefetches run ahead of the matvecs that read them
/// (`DECIMAMBA_DECODE_PREFETCH_MB` overrides it; 0: no prefetches).
pub const DECODE_PREFETCH_MIB: f64 = 0.0;
/// The least MiB a weight-reading decode kernel's prefetch window is weighed at
/// (`DECIMAMBA_DECODE_PREFETCH_FLOOR_MB`; see [`decode_prefetch`]).
pub const DECODE_PREFETCH_FLOOR_MIB: f64 = 0.0;

/// The L2 prefetches of a decode step: `ranges` holds (device address, bytes) pairs, and
/// kernel k of the step prefetches `ranges[spans[k].0 .. spans[k].0 + spans[k].1]`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DecodePrefetch {
    pub ranges: Vec<(u64, u64)>,
    pub spans: Vec<(usize, usize)>,
}

/// Which weights each kernel of a decode step prefetches into L2 so that the weight stream
/// runs about `lead` bytes ahead of the kernels that read it. `streams[k]` is the
/// (address, bytes) of the weights kernel k reads, in launch order (bytes 0: none). The
/// step repeats token after token, so the stream is a cycle of T bytes, and the kernels'
/// windows tile it, shifted by `lead`: kernel k prefetches [lead + C[k-1], lead + C[k]) of
/// the cycle, where C[k] adds up the windows' sizes so far. A window's size is T·w[k]/Σw,
/// with w[k] = max(bytes of kernel k, `floor`) for a kernel that reads weights (0 for one
/// that does not): `floor` 0 gives each kernel a window of its own size, so the L2 holds
/// about `lead` bytes not yet read; a `floor` near what HBM streams in a latency-bound
/// kernel's time gives the small kernels (x_proj, the scan step) more to prefetch and the
/// large matvecs less, so HBM keeps busy while the small ones run. Every byte is
/// prefetched once a step. The kernels issue their window in parts paced by their rounds of
/// rows (cuda.kernels.cu: prefetch_part). `lead` 0, or a step with no weights: no
/// prefetches. Ranges are trimmed to 16-byte boundaries (the bulk prefetch's granularity).
pub fn decode_prefetch(streams: &[(u64, u64)], lead: u64, floor: u64) -> DecodePrefetch {
    let total: u64 = streams.iter().map(|s| s.1).sum();
    let mut plan = DecodePrefetch::default();
    if lead == 0 || total == 0 {
        plan.spans = vec![(0, 0); streams.len()];
        return plan;
    }
    let lead = lead.min(total);
    // Where each stream starts in the cycle.
    let starts: Vec<u64> = streams
        .iter()
        .scan(0, |at, s| {
            let start = *at;
            *at += s.1;
            Some(start)
        })
        .collect();
    // The pieces of streams that cover [from, to) of the cycle (to - from <= total).
    let cover = |from: u64, to: u64, out: &mut Vec<(u64, u64)>| {
        for lap in [0, total] {
            for (s, &start) in streams.iter().zip(&starts) {
                let (lo, hi) = ((start + lap).max(from), (start + lap + s.1).min(to));
                if lo < hi {
                    let a = (s.0 + (lo - start - lap)).next_multiple_of(16);
                    let b = (s.0 + (hi - start - lap)) / 16 * 16;
                    // Pieces under 1 GiB: the kernel counts a range's 16-byte units in 32 bits.
                    let mut at = a;
                    while at < b {
                        let n = (b - at).min(1 << 30);
                        out.push((at, n));
                        at += n;
                    }
                }
            }
        }
    };
    let weight = |bytes: u64| if bytes == 0 { 0 } else { bytes.max(floor) };
    let weights: u128 = streams.iter().map(|s| weight(s.1) as u128).sum();
    // C[k] = T·(w[0] + … + w[k])/Σw, exact at the end (C = T).
    let mut sum = 0u128;
    let mut done = 0u64;
    for s in streams {
        let first = plan.ranges.len();
        sum += weight(s.1) as u128;
        let upto = (total as u128 * sum / weights) as u64;
        // The cycle's window, taken modulo its length.
        let from = (lead + done) % total;
        cover(from, from + (upto - done), &mut plan.ranges);
        done = upto;
        plan.spans.push((first, plan.ranges.len() - first));
    }
    plan
}

/// Whether rows of `k` elements of `elem_bytes` each, starting at device address `base`,
/// can be read 16 bytes at a time.
pub fn vec_ok(k: usize, base: u64, elem_bytes: usize) -> bool {
    (k * elem_bytes).is_multiple_of(16) && base.is_multiple_of(16)
}

/// Work a prefill stage does, for its fraction of the roofline (`DECIMAMBA_CUDA_PROFILE`).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Work {
    /// FLOPs on the tensor cores (bf16/f16 GEMMs; an FMA counts two).
    pub tensor_flops: f64,
    /// FLOPs on the f32 pipe (f32 GEMMs, the scan's recurrence).
    pub fp32_flops: f64,
    /// Special-function evaluations (the scan's exp2).
    pub exps: f64,
    /// Bytes to and from device memory, each at least once.
    pub bytes: f64,
}

impl Work {
    /// `[m, k] · [k, n]` in elements of `elem_bytes` (2: tensor cores, 4: f32 pipe).
    pub fn gemm(m: usize, n: usize, k: usize, elem_bytes: usize) -> Work {
        let flops = 2.0 * m as f64 * n as f64 * k as f64;
        let bytes = elem_bytes as f64 * (m * k + k * n + m * n) as f64;
        match elem_bytes {
            4 => Work {
                fp32_flops: flops,
                bytes,
                ..Work::default()
            },
            _ => Work {
                tensor_flops: flops,
                bytes,
                ..Work::default()
            },
        }
    }

    /// Only memory traffic.
    pub fn bytes(bytes: f64) -> Work {
        Work {
            bytes,
            ..Work::default()
        }
    }

    /// The time the device needs at least, and the roof that sets it.
    pub fn roofline(&self, peaks: &Peaks) -> (f64, &'static str) {
        [
            (self.tensor_flops / peaks.tensor_flops, "tensor"),
            (self.fp32_flops / peaks.fp32_flops, "fp32"),
            (self.exps / peaks.exps, "sfu"),
            (self.bytes / peaks.bytes, "memory"),
        ]
        .into_iter()
        .fold((0.0, "-"), |best, r| if r.0 > best.0 { r } else { best })
    }
}

impl std::ops::Add for Work {
    type Output = Work;

    fn add(self, o: Work) -> Work {
        Work {
            tensor_flops: self.tensor_flops + o.tensor_flops,
            fp32_flops: self.fp32_flops + o.fp32_flops,
            exps: self.exps + o.exps,
            bytes: self.bytes + o.bytes,
        }
    }
}

/// A device's peak rates per second.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Peaks {
    pub tensor_flops: f64,
    pub fp32_flops: f64,
    pub exps: f64,
    pub bytes: f64,
}

/// Peaks from the device's attributes: compute capability, SMs, boost clock (kHz), memory
/// clock (kHz, double data rate) and bus width (bits). Per SM and clock, dense: sm_90
/// (H100/H200) 4,096 bf16 tensor FLOPs, 256 f32 FLOPs, 16 SFU results (the CUDA C
/// Programming Guide's throughput table; 132 SMs at 1.98 GHz give 1,070 TFLOP/s against
/// NVIDIA's 989 at the 1.83 GHz its datasheet assumes); sm_80 2,048, 128, 16. Other
/// architectures: `None`, unless `DECIMAMBA_PEAK_TFLOPS` and `DECIMAMBA_PEAK_GBPS` say.
pub fn device_peaks(
    cc: (i32, i32),
    sms: i32,
    clock_khz: i32,
    mem_clock_khz: i32,
    bus_bits: i32,
) -> Option<Peaks> {
    let per_sm = match cc {
        (9, 0) => (4096.0, 256.0, 16.0),
        (8, 0) => (2048.0, 128.0, 16.0),
        _ => return None,
    };
    let clock = sms as f64 * clock_khz as f64 * 1e3;
    Some(Peaks {
        tensor_flops: per_sm.0 * clock,
        fp32_flops: per_sm.1 * clock,
        exps: per_sm.2 * clock,
        bytes: 2.0 * mem_clock_khz as f64 * 1e3 * bus_bits as f64 / 8.0,
    })
}

/// One profiled stage: total seconds over its calls, the roofline's share of that time.
#[derive(Debug, Clone, PartialEq)]
pub struct StageTime {
    pub name: &'static str,
    pub secs: f64,
    pub calls: u64,
    pub work: Work,
    /// Seconds the device needs at least for `work` and the roof that sets it (`None`
    /// without peaks or work).
    pub roofline: Option<(f64, &'static str)>,
}

/// A tuning variable's value: `None` when unset, an error naming the variable when it is
/// not a number of type `T`.
pub fn env_number<T: std::str::FromStr>(
    name: &str,
    value: Option<&str>,
) -> Result<Option<T>, String> {
    match value {
        None => Ok(None),
        Some(v) => v
            .trim()
            .parse()
            .map(Some)
            .map_err(|_| format!("{name}={v:?} is not a valid number")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_prefetch_covers_every_weight_once_and_leads_by_the_lead() {
        // Four kernels: 4,096 bytes at 0x10000, none, 1,600 at 0x20000, 800 at 0x30000; the
        // cycle is 6,496 bytes.
        let streams = [(0x10000, 4096), (0, 0), (0x20000, 1600), (0x30000, 800)];
        assert_eq!(
            decode_prefetch(&streams, 0, 0),
            DecodePrefetch {
                ranges: vec![],
                spans: vec![(0, 0); 4]
            }
        );
        let plan = decode_prefetch(&streams, 1024, 0);
        let of = |k: usize| {
            let (first, n) = plan.spans[k];
            plan.ranges[first..first + n].to_vec()
        };
        // Kernel 0 reads cycle bytes [0, 4096) and prefetches [1024, 5120): its own later
        // rows, then the third stream's first 1,024 bytes.
        assert_eq!(of(0), vec![(0x10000 + 1024, 3072), (0x20000, 1024)]);
        assert_eq!(of(1), vec![]);
        // [5120, 6720): the rest of the third stream, the fourth, and past the cycle's end
        // the next token's first 224 bytes.
        assert_eq!(
            of(2),
            vec![(0x20000 + 1024, 576), (0x30000, 800), (0x10000, 224)]
        );
        // [6720, 7520) is [224, 1024) of the next token.
        assert_eq!(of(3), vec![(0x10000 + 224, 800)]);
        // Every byte once a step.
        let mut ranges = plan.ranges.clone();
        ranges.sort();
        let mut merged: Vec<(u64, u64)> = Vec::new();
        for (a, n) in ranges {
            match merged.last_mut() {
                Some(last) if last.0 + last.1 == a => last.1 += n,
                _ => merged.push((a, n)),
            }
        }
        assert_eq!(
            merged,
            vec![(0x10000, 4096), (0x20000, 1600), (0x30000, 800)]
        );
        // A lead of the whole cycle or more: each kernel prefetches its own next token's.
        let whole = decode_prefetch(&streams, 1 << 40, 0);
        assert_eq!(whole.ranges[whole.spans[2].0], (0x20000, 1600));
        // Unaligned edges are trimmed inwards to 16 bytes.
        let odd = decode_prefetch(&[(0x1000, 100), (0x2008, 100)], 50, 0);
        assert_eq!(
            odd.ranges,
            vec![(0x1040, 32), (0x2010, 32), (0x2040, 32), (0x1000, 48)]
        );
        // A floor of 1,600 bytes: the windows weigh 4,096, 0, 1,600 and 1,600 of 7,296, so
        // the 6,496-byte cycle splits at 3,646, 3,646, 5,071 and 6,496, from the lead on;
        // the windows' inner edges are trimmed to 16 bytes.
        let floored = decode_prefetch(&streams, 1024, 1600);
        assert_eq!(floored.spans, vec![(0, 2), (2, 0), (2, 2), (4, 2)]);
        assert_eq!(
            floored.ranges,
            vec![
                (0x10000 + 1024, 3072),
                (0x20000, 560),
                (0x20000 + 576, 1024),
                (0x30000, 384),
                (0x30000 + 400, 400),
                (0x10000, 1024),
            ]
        );
    }

    #[test]
    fn single_scan_tiles_match_the_kernel_and_fall_back_when_too_large() {
        let ss = SingleScan::DEFAULT;
        // Rows of 12 floats (three 16-byte units would be odd: 8 + 4); 62,208 bytes at 16.
        assert_eq!(ss.row(), 12);
        assert_eq!(ss.smem_bytes(16), 4 * (2 * 16 * 388 + 2 * 4 * 392));
        let shape = |channels, items| SingleScan { channels, items };
        assert_eq!(shape(8, 4).row(), 4);
        assert_eq!(shape(4, 12).row(), 12);
        assert_eq!(shape(4, 16).row(), 20);
        assert_eq!(shape(4, 5).row(), 6);
        let h100 = 227 * 1024;
        assert!(ss.fits(16, h100) && ss.fits(64, h100) && !ss.fits(16, 48 * 1024));
        assert!(!shape(4, 16).fits(64, h100));
        assert!(shape(8, 4).fits(16, 48 * 1024));
        assert_eq!(ss.grid(2, 1536), (384, 1, 2));
        assert_eq!(ss.grid(1, 1537), (385, 1, 1));
        // The kernel lays its tiles out with the same strides.
        let src = include_str!("cuda.kernels.cu");
        for line in [
            "#define SS_ROW (SS_ITEMS % 8 == 0 ? SS_ITEMS + 4 : SS_ITEMS)",
            "#define SS_ROW (SS_ITEMS + 1)",
            "#define SS_BC_STRIDE (32 * SS_ROW + 4)",
            "#define SS_CH_STRIDE (32 * SS_ROW + 8)",
        ] {
            assert!(src.contains(line), "{line}");
        }
    }

    #[test]
    fn scan_kind_parses_and_names_bad_values() {
        let p = |v| ScanKind::parse("DECIMAMBA_SCAN", v);
        assert_eq!(p("chunked"), Ok(ScanKind::Chunked));
        assert_eq!(p("single"), Ok(ScanKind::Single(SingleScan::DEFAULT)));
        assert_eq!(
            p("single:8:4"),
            Ok(ScanKind::Single(SingleScan {
                channels: 8,
                items: 4
            }))
        );
        for bad in [
            "",
            "fast",
            "single:8",
            "single:0:8",
            "single:4:64",
            "single:a:8",
        ] {
            let e = p(bad).unwrap_err();
            assert!(e.starts_with("DECIMAMBA_SCAN="), "{e}");
        }
    }

    #[test]
    fn scan_chunks_cover_the_sequence_and_fill_the_gpu() {
        for &(batch, d_inner) in &[(1, 1536), (1, 5120), (4, 1536), (64, 5120), (1, 16)] {
            for len in [1, 2, 63, 64, 65, 1000, 2048, 32_768, 131_072, 1 << 22] {
                let (n, c) = scan_chunks(batch, d_inner, len);
                assert!(n >= 1 && c >= 1, "{batch}x{d_inner}, {len}");
                assert!(n * c >= len, "chunks must cover: {n} × {c} < {len}");
                assert!(
                    (n - 1) * c < len,
                    "an empty last chunk: {n} × {c} for {len}"
                );
                assert!(n <= MAX_GRID_YZ);
                if n > 1 {
                    assert!(n <= len.div_ceil(SCAN_MIN_CHUNK));
                    assert!(2 * c > SCAN_MIN_CHUNK, "chunk of {c} for {len}");
                    // Not more chunks than it takes to fill the GPU.
                    let threads = batch * d_inner * n;
                    assert!(threads < 2 * SCAN_TARGET_THREADS + batch * d_inner);
                }
            }
        }
        // 130m at 128K with batch 1: a couple of hundred chunks of several hundred steps.
        assert_eq!(scan_chunks(1, 1536, 131_072), (171, 767));
        // Wide batches need no time chunks at all.
        assert_eq!(scan_chunks(128, 5120, 4096), (1, 4096));
        // A larger target cuts more, shorter chunks; the floor of one chunk holds.
        assert_eq!(scan_chunks_for(1, 1536, 131_072, 1 << 19), (342, 384));
        assert_eq!(scan_chunks_for(1, 1536, 131_072, 0), (1, 131_072));
    }

    #[test]
    fn conv_tiles_stay_within_the_grid() {
        for len in [
            1, 31, 32, 33, 2048, 131_072, 2_097_120, 2_097_121, 10_000_000,
        ] {
            let t = conv_tile(len);
            assert!(t >= 32);
            assert!(len.div_ceil(t) <= MAX_GRID_YZ, "{len} tokens, tile {t}");
        }
        assert_eq!(conv_tile(131_072), 32);
    }

    #[test]
    fn decode_fits_the_shared_memory() {
        assert!(decode_fits(1, 768, 1536)); // 130m
        assert!(decode_fits(8, 768, 1536));
        assert!(!decode_fits(9, 768, 1536));
        assert!(!decode_fits(0, 768, 1536));
        assert!(decode_fits(2, 2560, 5120)); // 2.8b: 2 × 5120 × 4 = 40 KiB
        assert!(!decode_fits(3, 2560, 5120));
    }

    #[test]
    fn decode_split_fills_the_gpu_without_tiny_slices() {
        for &(n, k) in &[
            (10_240, 2560), // 2.8b in_proj
            (192, 5120),    // 2.8b x_proj
            (2560, 5120),   // 2.8b out_proj
            (50_280, 2560), // 2.8b lm_head
            (3072, 768),    // 130m in_proj
            (80, 1536),     // 130m x_proj
            (768, 1536),    // 130m out_proj
            (1, 8),
            (7, 100_000),
        ] {
            for eb in [2, 4] {
                let s = decode_split(n, k, eb);
                assert!(
                    s.is_power_of_two() && s <= DECODE_BLOCK_WARPS,
                    "{n}x{k}: {s}"
                );
                if s > 1 {
                    // Split only while the GPU is not yet full, and never below the floor.
                    assert!(n * (s / 2) < DECODE_TARGET_WARPS);
                    assert!(k * eb / s >= DECODE_MIN_SLICE_BYTES, "{n}x{k}x{eb}: {s}");
                }
                let blocks = decode_blocks(n, s, 0);
                assert!(blocks * (DECODE_BLOCK_WARPS / s) >= n);
                assert!((blocks - 1) * (DECODE_BLOCK_WARPS / s) < n);
            }
        }
        assert_eq!(decode_split(10_240, 2560, 2), 1);
        assert_eq!(decode_split(2560, 5120, 2), 2);
        assert_eq!(decode_split(192, 5120, 2), 8);
        assert_eq!(decode_split(80, 1536, 2), 4); // four slices of 768 B
        assert_eq!(decode_split(80, 1536, 4), 8);
        assert_eq!(decode_split(768, 1536, 2), 4);
        assert_eq!(decode_split(1, 8, 2), 1);
        assert_eq!(decode_blocks(192, 8, 0), 192);
        assert_eq!(decode_blocks(10_240, 1, 0), 1280);
    }

    #[test]
    fn persistent_step_never_asks_for_more_blocks_than_are_resident() {
        assert_eq!(persistent_blocks(132, 2, 0), Some(264));
        assert_eq!(persistent_blocks(132, 2, 1), Some(132));
        assert_eq!(persistent_blocks(132, 2, 3), Some(264)); // the cap cannot raise it
        assert_eq!(persistent_blocks(132, 0, 0), None);
        assert_eq!(persistent_blocks(0, 2, 0), None);
        for sms in [1, 78, 132, 144] {
            for resident in 1..=4 {
                for cap in 0..=5 {
                    let b = persistent_blocks(sms, resident, cap).unwrap();
                    assert!(b <= sms * resident && b >= sms && b.is_multiple_of(sms));
                }
            }
        }
    }

    #[test]
    fn capped_decode_blocks_share_the_rows_evenly() {
        // 2.8b in_proj: 1,280 groups of 8 rows on 132 SMs × 3 blocks → 4 rounds of 320.
        assert_eq!(decode_blocks(10_240, 1, 396), 320);
        assert_eq!(decode_blocks(192, 8, 396), 192); // under the cap: one block per group
        for n in [1usize, 7, 80, 768, 1000, 3072, 10_240, 50_280] {
            for split in [1, 2, 4, 8] {
                let groups = n.div_ceil(DECODE_BLOCK_WARPS / split);
                for cap in [1, 2, 5, 132, 264, 396, 528] {
                    let blocks = decode_blocks(n, split, cap);
                    assert!((1..=cap.max(1)).contains(&blocks) || groups <= cap);
                    assert!(blocks <= groups, "{n}/{split}/{cap}");
                    // Blocks stride over the groups: the rounds are those the cap forces,
                    // and no block is more than one group short of the busiest.
                    let rounds = groups.div_ceil(blocks);
                    assert_eq!(rounds, groups.div_ceil(cap).max(1), "{n}/{split}/{cap}");
                    assert!(
                        groups > (rounds - 1) * blocks,
                        "{n}/{split}/{cap}: idle blocks"
                    );
                }
            }
        }
    }

    #[test]
    fn roofline_of_the_h100_and_a_gemm() {
        // H100 SXM: 132 SMs, 1,980 MHz, HBM3 at 2,619 MHz on 5,120 bits.
        let p = device_peaks((9, 0), 132, 1_980_000, 2_619_000, 5120).unwrap();
        assert!((p.bytes / 1e12 - 3.352).abs() < 1e-3, "{}", p.bytes);
        assert!((p.tensor_flops / 1e12 - 1070.5).abs() < 0.1);
        assert!((p.fp32_flops / 1e12 - 66.9).abs() < 0.1);
        assert!(device_peaks((7, 5), 40, 1, 1, 1).is_none());
        // 2.8b in_proj at 32K in bf16: 2·32768·10240·2560 FLOPs, compute-bound.
        let w = Work::gemm(32_768, 10_240, 2560, 2);
        assert_eq!(w.tensor_flops, 2.0 * 32_768.0 * 10_240.0 * 2560.0);
        assert_eq!(w.fp32_flops, 0.0);
        let (t, roof) = w.roofline(&p);
        assert_eq!(roof, "tensor");
        assert!((t - w.tensor_flops / p.tensor_flops).abs() < 1e-12);
        // A decode-like matvec is memory-bound; f32 GEMMs use the f32 pipe.
        assert_eq!(Work::gemm(1, 10_240, 2560, 2).roofline(&p).1, "memory");
        assert_eq!(Work::gemm(4096, 4096, 4096, 4).roofline(&p).1, "fp32");
        let e = Work {
            exps: 1e12,
            ..Work::default()
        };
        assert_eq!((e + Work::bytes(1.0)).roofline(&p).1, "sfu");
        assert_eq!(Work::default().roofline(&p), (0.0, "-"));
    }

    #[test]
    fn tuning_variables_parse_or_name_themselves() {
        assert_eq!(env_number::<usize>("X", None), Ok(None));
        assert_eq!(env_number::<usize>("X", Some("262144")), Ok(Some(262_144)));
        assert_eq!(env_number::<f64>("P", Some(" 4800 ")), Ok(Some(4800.0)));
        let e = env_number::<usize>("DECIMAMBA_SCAN_TARGET_THREADS", Some("lots")).unwrap_err();
        assert_eq!(
            e,
            "DECIMAMBA_SCAN_TARGET_THREADS=\"lots\" is not a valid number"
        );
        assert!(env_number::<usize>("X", Some("-1")).is_err());
        assert!(env_number::<f64>("X", Some("")).is_err());
    }

    #[test]
    fn sixteen_byte_loads_need_aligned_rows() {
        assert!(vec_ok(768, 0, 2));
        assert!(vec_ok(8, 256, 2));
        assert!(!vec_ok(12, 0, 2)); // 24-byte rows
        assert!(!vec_ok(768, 8, 2)); // misaligned base
        assert!(vec_ok(4, 16, 4));
        assert!(!vec_ok(5, 0, 4));
    }

    /// The scan's FMA-pipe exponential (cuda.kernels.cu: poly_exp2, `-DSCAN_POLY_EXP`),
    /// evaluated here in f32 with the kernel's own coefficients, read from the source: as
    /// accurate as MUFU's ex2.approx, exactly 1 at 0 (a zeroed Δ keeps the state) and
    /// never above 1 for x ≤ 0 (no decay grows the state).
    #[test]
    fn scan_polynomial_exp2_is_accurate_and_never_grows_the_state() {
        let src = include_str!("cuda.kernels.cu");
        let start = src
            .find("float poly_exp2(float x)")
            .expect("poly_exp2 in the kernels");
        let body = &src[start..start + src[start..].find("\n}").unwrap()];
        let coeffs: Vec<f32> = body
            .split(|c: char| !(c.is_ascii_digit() || c == '.' || c == 'f'))
            .filter(|w| w.contains('.') && w.ends_with('f'))
            .map(|w| w.trim_end_matches('f').parse().unwrap())
            .collect();
        // The clamp 125.0f (its sign is outside the literal), the two 1.5·2^23 shifts, then the
        // Horner chain from the top coefficient.
        assert_eq!(coeffs.len(), 9, "{coeffs:?}");
        assert_eq!(&coeffs[..3], &[125.0, 12_582_912.0, 12_582_912.0]);
        let horner = &coeffs[3..];
        let poly_exp2 = |x: f32| -> f32 {
            let x = x.max(-125.0);
            let shifted = x + 12_582_912.0f32;
            let f = x - (shifted - 12_582_912.0);
            let p = horner[1..].iter().fold(horner[0], |p, &c| p.mul_add(f, c));
            f32::from_bits(p.to_bits().wrapping_add(shifted.to_bits() << 23))
        };
        assert_eq!(poly_exp2(0.0), 1.0);
        assert_eq!(poly_exp2(-1e-9), 1.0);
        let mut worst = 0f64;
        for i in 0..=2_000_000 {
            let x = -125.0 * i as f32 / 2_000_000.0;
            let got = poly_exp2(x);
            let want = (x as f64).exp2();
            worst = worst.max((got as f64 - want).abs() / want);
            if x > -0.75 {
                assert!(got <= 1.0, "2^{x} = {got} > 1");
            }
        }
        assert!(worst < 2.5e-7, "max relative error {worst:.3e}");
        assert!(poly_exp2(-1000.0) > 0.0 && poly_exp2(-1000.0) < 3e-38);
    }
}

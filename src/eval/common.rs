//! Pieces both evaluations share: length and depth parsing, methods, output
//! folders, atomic writes, progress bars, Ctrl-C handling and text tables.

use crate::policy::{DecimationConfig, Policy};
use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

pub use crate::policy::{DECIMAMBA, VANILLA};

/// One way of running the model: a named context policy. Vanilla and DeciMamba keep the
/// record they had before policies existed (`decimation`: the config or null); other
/// methods add their policy file's JSON as `policy`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "MethodRecord", into = "MethodRecord")]
pub struct Method {
    /// `vanilla`, `decimamba`, `mambaextend`, … (made distinct within a run).
    pub name: String,
    pub policy: Policy,
}

#[derive(Serialize, Deserialize)]
struct MethodRecord {
    name: String,
    decimation: Option<DecimationConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    policy: Option<serde_json::Value>,
}

impl From<Method> for MethodRecord {
    fn from(m: Method) -> Self {
        MethodRecord {
            decimation: m.policy.decimation().cloned(),
            policy: m.policy_json(),
            name: m.name,
        }
    }
}

impl TryFrom<MethodRecord> for Method {
    type Error = anyhow::Error;
    fn try_from(r: MethodRecord) -> Result<Self> {
        let policy = match (r.policy, r.decimation) {
            (Some(p), _) => Policy::from_json(p)?,
            (None, Some(c)) => Policy::DeciMamba(c),
            (None, None) => Policy::Vanilla,
        };
        Ok(Method {
            name: r.name,
            policy,
        })
    }
}

impl Method {
    /// Vanilla Mamba (no policy).
    pub fn vanilla() -> Self {
        Self::of(Policy::Vanilla)
    }

    /// DeciMamba with `config`.
    pub fn decimamba(config: DecimationConfig) -> Self {
        Self::of(Policy::DeciMamba(config))
    }

    /// `policy`, named by its method.
    pub fn of(policy: Policy) -> Self {
        Method {
            name: policy.name().to_string(),
            policy,
        }
    }

    /// The single method of a run without `--compare`: DeciMamba when a
    /// decimation was resolved, else vanilla.
    pub fn from_resolved(decimation: Option<DecimationConfig>) -> Self {
        match decimation {
            Some(c) => Method::decimamba(c),
            None => Method::vanilla(),
        }
    }

    /// The two methods of a `--compare` run: vanilla, then DeciMamba.
    pub fn compare(config: DecimationConfig) -> Vec<Self> {
        vec![Method::vanilla(), Method::decimamba(config)]
    }

    /// DeciMamba's config, when this is DeciMamba (`decimation` in records).
    pub fn decimation(&self) -> Option<&DecimationConfig> {
        self.policy.decimation()
    }

    /// The policy file's JSON for methods other than vanilla and DeciMamba.
    pub fn policy_json(&self) -> Option<serde_json::Value> {
        match &self.policy {
            Policy::Vanilla | Policy::DeciMamba(_) => None,
            p => Some(p.to_json()),
        }
    }
}

/// Knobs of a run that do not change its results.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Hide progress bars.
    pub quiet: bool,
    /// When set (e.g. by Ctrl-C), the run stops after the current sample or
    /// window; everything finished is already in `results.jsonl`.
    pub stop: Option<Arc<AtomicBool>>,
    /// Work units of one length scored together (0 or 1: one at a time). Results do not
    /// depend on it.
    pub batch_size: usize,
    /// Run only this slice of the sweep's units (`--shard I/N`); `merge` joins the slices.
    pub shard: Option<super::sweep::Shard>,
}

impl RunOptions {
    /// Whether the run was asked to stop.
    pub fn stopped(&self) -> bool {
        self.stop
            .as_ref()
            .map(|s| s.load(Ordering::SeqCst))
            .unwrap_or(false)
    }
}

/// Installs a Ctrl-C handler: the first press sets the returned flag (the run
/// stops, mid-prefill too when the model holds the flag, and can be resumed), a second press exits
/// at once with status 130. If another handler is already installed, the flag
/// is returned but never set.
pub fn install_interrupt_flag() -> Arc<AtomicBool> {
    let flag = Arc::new(AtomicBool::new(false));
    let f = flag.clone();
    let _ = ctrlc::set_handler(move || {
        if f.swap(true, Ordering::SeqCst) {
            std::process::exit(130);
        }
        eprintln!(
            "\ninterrupted: stopping at the next layer (the item in progress is dropped; \
             finished results are saved, rerun the same command to resume). Press Ctrl-C \
             again to quit now."
        );
    });
    flag
}

/// `text` without a leading UTF-8 byte-order mark (U+FEFF), which Windows editors
/// write and which would otherwise become a token or break JSON parsing.
pub fn strip_bom(text: &str) -> &str {
    text.strip_prefix('\u{feff}').unwrap_or(text)
}

/// Parses one context length: a token count such as `1024`, or a number with
/// a `k`/`K` suffix meaning ×1024 (`2k` = 2048, `10k` = 10240).
pub fn parse_length(s: &str) -> Result<usize> {
    let t = s.trim();
    let bad = || {
        anyhow::anyhow!(
            "bad length '{s}': expected a positive token count like 1024, 2k or 16K (k = 1024)"
        )
    };
    let (digits, mult) = match t.strip_suffix(['k', 'K']) {
        Some(d) => (d, 1024usize),
        None => (t, 1usize),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let n: usize = digits.parse().map_err(|_| bad())?;
    let v = n.checked_mul(mult).ok_or_else(bad)?;
    if v == 0 {
        return Err(bad());
    }
    Ok(v)
}

/// Parses a comma-separated list of lengths (see [`parse_length`]); the
/// result is sorted and free of duplicates.
pub fn parse_lengths(s: &str) -> Result<Vec<usize>> {
    let mut v = s
        .split(',')
        .filter(|p| !p.trim().is_empty())
        .map(parse_length)
        .collect::<Result<Vec<_>>>()?;
    if v.is_empty() {
        bail!("no lengths given in '{s}'");
    }
    v.sort_unstable();
    v.dedup();
    Ok(v)
}

/// Parses a comma-separated list of needle depths in [0, 1]; sorted, deduplicated.
pub fn parse_depths(s: &str) -> Result<Vec<f64>> {
    let mut v = Vec::new();
    for p in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let d: f64 = p
            .parse()
            .map_err(|_| anyhow::anyhow!("bad depth '{p}': expected a number in [0, 1]"))?;
        if !(0.0..=1.0).contains(&d) {
            bail!("bad depth '{p}': expected a number in [0, 1]");
        }
        v.push(d);
    }
    if v.is_empty() {
        bail!("no depths given in '{s}'");
    }
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v.dedup();
    Ok(v)
}

/// Short label of a length: `2K` for multiples of 1024, else the number.
pub fn format_length(n: usize) -> String {
    if n >= 1024 && n.is_multiple_of(1024) {
        format!("{}K", n / 1024)
    } else {
        n.to_string()
    }
}

/// `runs/<kind>-YYYYMMDD-HHMMSS` (UTC), the default output folder.
pub fn default_out_dir(kind: &str) -> PathBuf {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    PathBuf::from("runs").join(format!("{kind}-{}", utc_stamp(secs)))
}

/// `YYYYMMDD-HHMMSS` of a Unix time (UTC).
pub fn utc_stamp(unix_secs: u64) -> String {
    let days = (unix_secs / 86_400) as i64;
    let rem = unix_secs % 86_400;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}{m:02}{d:02}-{:02}{:02}{:02}",
        rem / 3600,
        (rem / 60) % 60,
        rem % 60
    )
}

/// Writes `bytes` to `path` atomically: a temporary file beside it, then a rename.
pub fn atomic_write(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = temp_sibling(path);
    {
        let mut f = std::fs::File::create(&tmp)
            .with_context(|| format!("cannot create {}", tmp.display()))?;
        f.write_all(bytes)
            .with_context(|| format!("cannot write {}", tmp.display()))?;
        f.sync_all().ok();
    }
    std::fs::rename(&tmp, path)
        .with_context(|| format!("cannot move {} to {}", tmp.display(), path.display()))
}

/// Writes pretty JSON atomically.
pub fn atomic_write_json<T: Serialize + ?Sized>(path: &Path, value: &T) -> Result<()> {
    let mut s = serde_json::to_string_pretty(value)?;
    s.push('\n');
    atomic_write(path, s.as_bytes())
}

/// A temporary path beside `path` that keeps its extension (`.x.tmp.png` for
/// `x.png`), so encoders that pick a format by extension still work.
pub fn temp_sibling(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = match name.rsplit_once('.') {
        Some((stem, ext)) => format!(".{stem}.tmp-{}.{ext}", std::process::id()),
        None => format!(".{name}.tmp-{}", std::process::id()),
    };
    path.with_file_name(tmp)
}

/// A progress bar with ETA over `total` items, hidden when `quiet`.
pub fn progress_bar(total: u64, quiet: bool, what: &str) -> ProgressBar {
    if quiet {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new(total);
    let style = ProgressStyle::with_template(&format!(
        "{{spinner}} {what} [{{elapsed_precise}}] {{wide_bar}} {{pos}}/{{len}} ETA {{eta}} {{msg}}"
    ))
    .unwrap_or_else(|_| ProgressStyle::default_bar());
    pb.set_style(style);
    pb
}

/// A 64-bit FNV-1a hash, used to fingerprint inputs in `run.json`.
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// Mixes words into one well-spread 64-bit seed (SplitMix64 finaliser).
pub fn mix_seed(words: &[u64]) -> u64 {
    let mut h: u64 = 0x9e37_79b9_7f4a_7c15;
    for &w in words {
        h ^= w;
        h = h.wrapping_add(0x9e37_79b9_7f4a_7c15);
        h = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        h ^= h >> 31;
    }
    h
}

/// Renders a text table: the first column left-aligned, the others right-aligned.
pub fn render_table(header: &[String], rows: &[Vec<String>]) -> String {
    let ncol = header.len();
    let mut width = vec![0usize; ncol];
    for r in std::iter::once(header).chain(rows.iter().map(|r| r.as_slice())) {
        for (i, c) in r.iter().enumerate().take(ncol) {
            width[i] = width[i].max(c.chars().count());
        }
    }
    let line = |r: &[String]| {
        let mut s = String::new();
        for (i, c) in r.iter().enumerate().take(ncol) {
            if i > 0 {
                s.push_str("  ");
            }
            let pad = width[i] - c.chars().count();
            if i == 0 {
                s.push_str(c);
                s.push_str(&" ".repeat(pad));
            } else {
                s.push_str(&" ".repeat(pad));
                s.push_str(c);
            }
        }
        s.trim_end().to_string()
    };
    let mut out = line(header);
    out.push('\n');
    let total: usize = width.iter().sum::<usize>() + 2 * ncol.saturating_sub(1);
    out.push_str(&"-".repeat(total));
    out.push('\n');
    for r in rows {
        out.push_str(&line(r));
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_order_marks_are_stripped() {
        assert_eq!(strip_bom("\u{feff}abc"), "abc");
        assert_eq!(strip_bom("abc\u{feff}"), "abc\u{feff}");
        assert_eq!(strip_bom(""), "");
    }

    #[test]
    fn lengths_parse_with_k_suffix() {
        assert_eq!(parse_length("1024").unwrap(), 1024);
        assert_eq!(parse_length("2k").unwrap(), 2048);
        assert_eq!(parse_length(" 16K ").unwrap(), 16384);
        assert_eq!(parse_length("10k").unwrap(), 10240);
        assert_eq!(
            parse_lengths("4k,1k,2k,1024").unwrap(),
            vec![1024, 2048, 4096]
        );
    }

    #[test]
    fn bad_lengths_are_rejected_with_a_clear_message() {
        for bad in ["", "k", "2x", "-1", "1.5k", "0", "0k", "2kk"] {
            let e = parse_length(bad).unwrap_err().to_string();
            assert!(e.contains("bad length"), "{bad}: {e}");
            assert!(e.contains("k = 1024"), "{bad}: {e}");
        }
        assert!(parse_lengths(" , ").is_err());
        assert!(parse_lengths("1k,zz")
            .unwrap_err()
            .to_string()
            .contains("'zz'"));
    }

    #[test]
    fn depths_parse_and_validate() {
        assert_eq!(parse_depths("1,0,0.5").unwrap(), vec![0.0, 0.5, 1.0]);
        assert!(parse_depths("1.5").is_err());
        assert!(parse_depths("x").is_err());
        assert!(parse_depths("").is_err());
    }

    #[test]
    fn length_labels() {
        assert_eq!(format_length(1024), "1K");
        assert_eq!(format_length(131072), "128K");
        assert_eq!(format_length(1000), "1000");
    }

    #[test]
    fn utc_stamps() {
        assert_eq!(utc_stamp(0), "19700101-000000");
        assert_eq!(utc_stamp(951_782_400), "20000229-000000");
        assert_eq!(utc_stamp(1_700_000_000), "20231114-221320");
    }

    #[test]
    fn temp_sibling_keeps_extension() {
        let t = temp_sibling(Path::new("/a/b/heat.png"));
        assert_eq!(t.parent().unwrap(), Path::new("/a/b"));
        assert!(t.to_string_lossy().ends_with(".png"));
        assert_ne!(t, Path::new("/a/b/heat.png"));
    }

    #[test]
    fn atomic_write_replaces_file() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("x.json");
        atomic_write(&p, b"one").unwrap();
        atomic_write(&p, b"two").unwrap();
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "two");
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 1);
    }

    #[test]
    fn tables_align() {
        let t = render_table(
            &["a".into(), "bb".into()],
            &[vec!["xyz".into(), "1".into()]],
        );
        assert_eq!(t, "a    bb\n-------\nxyz   1\n");
    }
}

//! Files from the Hugging Face hub, through the `hf-hub` crate and its cache.
//!
//! The cache is the one `huggingface_hub` uses (`$HF_HUB_CACHE`, else `$HF_HOME/hub`, else
//! `~/.cache/huggingface/hub`, laid out as `models--ORG--NAME/{refs,snapshots,blobs}`), so
//! files downloaded by Python tools are found here too. `HF_HUB_OFFLINE=1` reads the cache
//! only; `HF_TOKEN` (or the cache's `token` file) authenticates downloads; `HF_ENDPOINT`
//! selects a mirror.

use anyhow::{bail, Context, Result};
use hf_hub::{Cache, Repo, RepoType};
use std::path::PathBuf;

/// A repository on the hub at one revision.
#[derive(Debug, Clone)]
pub struct HubRepo {
    pub repo_id: String,
    pub revision: String,
    pub repo_type: RepoType,
    cache: Cache,
    offline: bool,
}

/// True when `HF_HUB_OFFLINE` asks for cache-only operation.
pub fn offline_from_env() -> bool {
    matches!(
        std::env::var("HF_HUB_OFFLINE")
            .map(|v| v.trim().to_ascii_lowercase())
            .as_deref(),
        Ok("1" | "true" | "yes" | "on")
    )
}

/// The hub cache directory, following huggingface_hub's variables.
pub fn cache_from_env() -> Cache {
    match std::env::var_os("HF_HUB_CACHE") {
        Some(p) if !p.is_empty() => Cache::new(PathBuf::from(p)),
        _ => Cache::from_env(),
    }
}

/// Whether `s` looks like `org/name` rather than a path on disk.
pub fn looks_like_repo_id(s: &str) -> bool {
    let parts: Vec<&str> = s.split('/').collect();
    parts.len() == 2
        && parts.iter().all(|p| {
            !p.is_empty()
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
                && !p.starts_with('.')
        })
}

impl HubRepo {
    pub fn new(repo_id: &str, revision: &str, repo_type: RepoType) -> Self {
        Self {
            repo_id: repo_id.to_string(),
            revision: revision.to_string(),
            repo_type,
            cache: cache_from_env(),
            offline: offline_from_env(),
        }
    }

    /// Uses `cache` instead of the one from the environment (for tests).
    pub fn with_cache(mut self, cache: Cache, offline: bool) -> Self {
        self.cache = cache;
        self.offline = offline;
        self
    }

    fn repo(&self) -> Repo {
        Repo::with_revision(self.repo_id.clone(), self.repo_type, self.revision.clone())
    }

    /// The cached copy of `filename`, if any. A revision that is a commit hash is looked up
    /// in `snapshots/` directly (refs only name branches and tags).
    pub fn cached(&self, filename: &str) -> Option<PathBuf> {
        if let Some(p) = self.cache.repo(self.repo()).get(filename) {
            return Some(p);
        }
        let folder = format!(
            "{}s--{}",
            match self.repo_type {
                RepoType::Model => "model",
                RepoType::Dataset => "dataset",
                RepoType::Space => "space",
            },
            self.repo_id.replace('/', "--")
        );
        let p = self
            .cache
            .path()
            .join(folder)
            .join("snapshots")
            .join(&self.revision)
            .join(filename);
        p.exists().then_some(p)
    }

    /// `filename` from the cache, else downloaded (unless offline). `Ok(None)` when the
    /// repo does not have the file.
    pub fn get(&self, filename: &str) -> Result<Option<PathBuf>> {
        if let Some(p) = self.cached(filename) {
            return Ok(Some(p));
        }
        if self.offline {
            return Ok(None);
        }
        let token = std::env::var("HF_TOKEN")
            .ok()
            .filter(|t| !t.is_empty())
            .or_else(|| self.cache.token());
        let mut builder = hf_hub::api::sync::ApiBuilder::from_cache(self.cache.clone())
            .with_token(token)
            .with_progress(true);
        if let Ok(endpoint) = std::env::var("HF_ENDPOINT") {
            if !endpoint.is_empty() {
                builder = builder.with_endpoint(endpoint);
            }
        }
        let api = builder
            .build()
            .context("cannot set up the Hugging Face hub client")?;
        match api.repo(self.repo()).get(filename) {
            Ok(p) => Ok(Some(p)),
            // ureq reports a missing file as status 404.
            Err(e) if e.to_string().contains("404") => Ok(None),
            Err(e) => bail!(
                "cannot download {filename} from {} (revision {}): {e}; set HF_HUB_OFFLINE=1 to use the cache only",
                self.repo_id,
                self.revision
            ),
        }
    }

    /// Like [`get`](Self::get) but the file must exist.
    pub fn require(&self, filename: &str) -> Result<PathBuf> {
        match self.get(filename)? {
            Some(p) => Ok(p),
            None if self.offline => bail!(
                "{filename} of {} (revision {}) is not in the hub cache at {} and HF_HUB_OFFLINE is set",
                self.repo_id,
                self.revision,
                self.cache.path().display()
            ),
            None => bail!("{} (revision {}) has no file {filename}", self.repo_id, self.revision),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_repo_ids() {
        assert!(looks_like_repo_id("state-spaces/mamba-130m"));
        assert!(looks_like_repo_id("assafbk/decimamba-130m-niah"));
        assert!(!looks_like_repo_id("./models/x"));
        assert!(!looks_like_repo_id("/abs/path"));
        assert!(!looks_like_repo_id("a/b/c"));
        assert!(!looks_like_repo_id("model"));
    }
}

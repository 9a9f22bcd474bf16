//! Embeds the shipped default model and the fallback tokenizer when their files exist, so a
//! checkout without them (e.g. while retraining) still builds.
use std::path::Path;

const MODEL_DIR: &str = "models/passkey-mamba";
const MODEL_FILES: &[&str] = &["config.json", "model.safetensors", "tokenizer.json"];
const NEOX: &str = "assets/gpt-neox-20b-tokenizer.json.gz";

fn main() {
    println!("cargo::rustc-check-cfg=cfg(embedded_model)");
    println!("cargo::rustc-check-cfg=cfg(embedded_neox)");
    println!("cargo::rerun-if-changed={MODEL_DIR}");
    println!("cargo::rerun-if-changed=assets");
    if MODEL_FILES
        .iter()
        .all(|f| Path::new(MODEL_DIR).join(f).exists())
    {
        println!("cargo::rustc-cfg=embedded_model");
    }
    if Path::new(NEOX).exists() {
        println!("cargo::rustc-cfg=embedded_neox");
    }
}

//! The normative documents match the code: docs/feature-store.md's example manifest is what mono
//! reads and writes, its field table lists exactly the fields mono writes, and the shard tensor
//! names it specifies are mono's.

use std::collections::BTreeSet;
use std::path::Path;

use mono::data::store::{
    BatchLabels, LabelKind, Manifest, StoreInfo, StoreWriter, FEATURES, FORMAT, LABELS,
    LABEL_OFFSETS, LABEL_VALUES, MANIFEST_FILE, PATHS_KEY,
};

fn feature_store_doc() -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/feature-store.md"))
        .unwrap()
}

fn json_block(doc: &str) -> String {
    let blocks: Vec<&str> = doc.split("```json\n").skip(1).collect();
    assert_eq!(blocks.len(), 1, "docs/feature-store.md has one example manifest");
    blocks[0].split("```").next().unwrap().to_string()
}

/// First-column names of the table whose rows start with "| `".
fn table_fields(doc: &str) -> BTreeSet<String> {
    doc.lines()
        .filter_map(|l| l.strip_prefix("| `"))
        .filter_map(|l| l.split('`').next())
        .map(str::to_string)
        .collect()
}

#[test]
fn the_example_manifest_is_what_mono_reads_and_writes() {
    let text = json_block(&feature_store_doc());
    let manifest: Manifest = serde_json::from_str(&text).expect("the example parses as a manifest");
    manifest.validate().expect("the example is a valid manifest");
    assert_eq!(manifest.format, FORMAT);
    // Written back, it is the same document (field names, nesting, order of the values).
    let again: serde_json::Value = serde_json::to_value(&manifest).unwrap();
    let example: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(again, example, "the example manifest differs from mono's serialisation");
}

#[test]
fn the_field_table_lists_exactly_the_fields_mono_writes() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("train");
    let mut info = StoreInfo::new(3, "train");
    info.labels = LabelKind::Class;
    info.label_names = vec!["a".into(), "b".into()];
    let mut writer = StoreWriter::create(&dir, info, 2).unwrap();
    let paths: Vec<String> = (0..3).map(|i| format!("img{i}.png")).collect();
    writer.push(&[1.0; 9], BatchLabels::Class(&[0, 1, 1]), &paths).unwrap();
    writer.skip("broken.png", "cannot decode");
    writer.finish().unwrap();
    let written: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join(MANIFEST_FILE)).unwrap()).unwrap();
    let written: BTreeSet<String> = written.as_object().unwrap().keys().cloned().collect();
    let doc = feature_store_doc();
    let documented = table_fields(&doc);
    assert_eq!(documented, written, "docs/feature-store.md's field table vs a written manifest");

    // The shard tensors and metadata keys the document specifies.
    for name in [FEATURES, LABELS, LABEL_OFFSETS, LABEL_VALUES, PATHS_KEY] {
        assert!(doc.contains(&format!("`{name}`")), "docs/feature-store.md does not name `{name}`");
    }
    let shard = std::fs::read(dir.join("shard-00000.safetensors")).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&shard).unwrap();
    let tensors: BTreeSet<String> = meta.tensors().keys().cloned().collect();
    assert_eq!(tensors, [FEATURES, LABELS].iter().map(|s| s.to_string()).collect());
    assert!(meta.metadata().as_ref().is_some_and(|m| m.contains_key(PATHS_KEY)));
}

//! The layering of src/: every module imports only from the layers below it (docs/architecture.md).

use std::path::{Path, PathBuf};

/// The layers, lowest first; a module may use its own layer and those before it.
const LAYERS: [&str; 13] = [
    "base",
    "data",
    "models",
    "encoders",
    "extract",
    "monoscore",
    "sae",
    "layout",
    "train",
    "eval",
    "report",
    "pipeline",
    "bench",
];

fn rank(module: &str) -> Option<usize> {
    LAYERS.iter().position(|l| *l == module)
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The code of a file without comments (a `crate::x` in a doc comment is no dependency).
fn code_lines(text: &str) -> impl Iterator<Item = (usize, &str)> {
    text.lines().enumerate().map(|(i, l)| (i + 1, l.split("//").next().unwrap_or("")))
}

/// `crate::<module>` references of a line.
fn crate_references(line: &str) -> Vec<&str> {
    line.match_indices("crate::")
        .filter(|(i, _)| !line[..*i].ends_with(|c: char| c.is_alphanumeric() || c == '_'))
        .map(|(i, m)| {
            let rest = &line[i + m.len()..];
            let end = rest.find(|c: char| !(c.is_alphanumeric() || c == '_')).unwrap_or(rest.len());
            &rest[..end]
        })
        .collect()
}

#[test]
fn every_import_points_down_the_layers() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut violations = Vec::new();
    let mut checked = 0;
    for file in &files {
        let relative = file.strip_prefix(&src).unwrap();
        let top = relative.components().next().unwrap().as_os_str().to_string_lossy();
        let module = top.trim_end_matches(".rs");
        if module == "lib" || module == "main" {
            continue;
        }
        let own = rank(module).unwrap_or_else(|| panic!("src/{module} is in no layer of LAYERS"));
        let text = std::fs::read_to_string(file).unwrap();
        for (line_no, line) in code_lines(&text) {
            for target in crate_references(line) {
                checked += 1;
                let to = if target == "Config" { Some(0) } else { rank(target) };
                match to {
                    Some(to) if to <= own => {}
                    Some(_) => violations.push(format!(
                        "src/{}:{line_no}: {module} uses crate::{target}, a layer above it",
                        relative.display()
                    )),
                    None => violations.push(format!(
                        "src/{}:{line_no}: crate::{target} is in no layer",
                        relative.display()
                    )),
                }
            }
        }
    }
    assert!(checked > 100, "the check found only {checked} references: is it reading src/?");
    assert!(violations.is_empty(), "imports against the layering:\n{}", violations.join("\n"));
}

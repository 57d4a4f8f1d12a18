//! Goal: the crate's modules form layers: no import cycle among the modules of `src/`, and
//! the pure core (`core/`, `entity`) names nothing of the actor shell, the store or the
//! effect workers (issue 11, part 1).
//! Method: read every source file, collect its `crate::...` paths outside comments, resolve
//! each to the deepest module that exists, and search the graph for cycles. A module's own
//! submodules (declared with `mod`) are not imports.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Module name (`runtime::actor`) -> its source text.
fn modules(dir: &Path, prefix: &str, out: &mut BTreeMap<String, String>) {
    for entry in std::fs::read_dir(dir).expect("src is readable") {
        let path = entry.expect("entry").path();
        let stem = path
            .file_stem()
            .and_then(|s| s.to_str())
            .expect("utf-8 name")
            .to_string();
        if path.is_dir() {
            modules(&path, &format!("{prefix}{stem}::"), out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            let name = match stem.as_str() {
                "mod" => prefix.trim_end_matches("::").to_string(),
                "lib" if prefix.is_empty() => continue,
                _ => format!("{prefix}{stem}"),
            };
            out.insert(name, std::fs::read_to_string(&path).expect("source"));
        }
    }
}

/// Every module each module imports.
fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let mut sources = BTreeMap::new();
    modules(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("src"),
        "",
        &mut sources,
    );
    let names: BTreeSet<String> = sources.keys().cloned().collect();
    let resolve = |path: &str| -> Option<String> {
        let parts: Vec<&str> = path.split("::").collect();
        (1..=parts.len())
            .rev()
            .map(|n| parts[..n].join("::"))
            .find(|candidate| names.contains(candidate))
    };
    let mut graph = BTreeMap::new();
    for (name, source) in &sources {
        let code: String = source
            .lines()
            .filter(|l| !l.trim_start().starts_with("//"))
            .collect::<Vec<_>>()
            .join("\n");
        let mut imports = BTreeSet::new();
        let mut rest = code.as_str();
        while let Some(at) = rest.find("crate::") {
            rest = &rest[at + "crate::".len()..];
            let path: String = rest
                .chars()
                .take_while(|c| c.is_ascii_lowercase() || *c == '_' || *c == ':')
                .collect();
            let mut paths = vec![path.trim_end_matches(':').to_string()];
            // `crate::a::{b, c::d}`: each item extends the path.
            if path.ends_with("::") && rest[path.len()..].starts_with('{') {
                let group = &rest[path.len() + 1..rest.find('}').unwrap_or(rest.len())];
                for item in group.split(',') {
                    let head = item.trim().split("::").next().unwrap_or("");
                    paths.push(format!("{path}{head}"));
                }
            }
            for path in paths {
                if let Some(target) = resolve(&path) {
                    let own = target == *name || target.starts_with(&format!("{name}::"));
                    let parent = name.starts_with(&format!("{target}::"));
                    if !own && !parent {
                        imports.insert(target);
                    }
                }
            }
        }
        graph.insert(name.clone(), imports);
    }
    graph
}

/// A cycle through `start`, if any (depth-first search).
fn cycle_from(
    graph: &BTreeMap<String, BTreeSet<String>>,
    node: &str,
    path: &mut Vec<String>,
    done: &mut BTreeSet<String>,
) -> Option<Vec<String>> {
    if let Some(at) = path.iter().position(|n| n == node) {
        let mut cycle = path[at..].to_vec();
        cycle.push(node.to_string());
        return Some(cycle);
    }
    if done.contains(node) {
        return None;
    }
    path.push(node.to_string());
    for next in graph.get(node).into_iter().flatten() {
        if let Some(cycle) = cycle_from(graph, next, path, done) {
            return Some(cycle);
        }
    }
    path.pop();
    done.insert(node.to_string());
    None
}

#[test]
fn the_modules_of_src_have_no_import_cycle() {
    let graph = graph();
    assert!(
        graph.len() > 20,
        "the graph must see the crate: {:?}",
        graph.keys()
    );
    assert!(
        graph["runtime::actor"].contains("runtime::mail"),
        "the parser must see imports: {:?}",
        graph["runtime::actor"]
    );
    let mut done = BTreeSet::new();
    for node in graph.keys() {
        if let Some(cycle) = cycle_from(&graph, node, &mut Vec::new(), &mut done) {
            panic!("import cycle: {}", cycle.join(" -> "));
        }
    }
}

#[test]
fn the_pure_core_names_nothing_of_the_shell() {
    let graph = graph();
    let shell = ["runtime", "store", "effects", "testkit", "telemetry"];
    for (name, imports) in &graph {
        if name == "entity" || name == "core" || name.starts_with("core::") {
            for import in imports {
                let root = import.split("::").next().unwrap_or("");
                assert!(
                    !shell.contains(&root),
                    "{name} imports {import}, part of the shell"
                );
            }
        }
    }
}

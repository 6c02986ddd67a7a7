//! The proxy's modules import each other without a cycle: each `crate::<module>` path in
//! `proxy/src` (in `use` lines and inline) is an edge from the file's top-level module to that
//! module, and the graph must be acyclic. Submodules count as their top-level module (a
//! `rewrite/` file using `crate::rewrite::RewriteError` is no edge); `lib.rs` (the re-exports)
//! and test code (from `#[cfg(test)]` on, and `tests.rs`) are left out.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

type Graph = BTreeMap<String, BTreeSet<String>>;

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            rust_files(&path, out)?;
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
    Ok(())
}

/// `src/rewrite/create.rs` → `rewrite`, `src/intercept.rs` → `intercept`.
fn top_module(src: &Path, file: &Path) -> Option<String> {
    let rel = file.strip_prefix(src).ok()?;
    let first = rel.components().next()?.as_os_str().to_str()?;
    Some(first.trim_end_matches(".rs").to_string())
}

fn is_ident_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// The top-level modules a piece of code names through `crate::`, including each branch of
/// `crate::{a::X, b}`.
fn crate_refs(code: &str) -> BTreeSet<String> {
    let mut refs = BTreeSet::new();
    let mut rest = code;
    while let Some(at) = rest.find("crate::") {
        let preceded_by_ident = rest[..at].chars().next_back().is_some_and(is_ident_char);
        rest = &rest[at + "crate::".len()..];
        if preceded_by_ident {
            continue; // `weave_crate::` and the like
        }
        if let Some(group) = rest.strip_prefix('{') {
            // Top-level branches of the group: split on commas at brace depth 0.
            let mut depth = 0usize;
            let mut start = 0;
            let mut branches = Vec::new();
            for (i, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => {
                        branches.push(&group[start..i]);
                        break;
                    }
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        branches.push(&group[start..i]);
                        start = i + 1;
                    }
                    _ => {}
                }
            }
            for branch in branches {
                let name: String = branch
                    .trim()
                    .chars()
                    .take_while(|&c| is_ident_char(c))
                    .collect();
                if !name.is_empty() && branch.trim()[name.len()..].starts_with("::") {
                    refs.insert(name);
                }
            }
        } else {
            let name: String = rest.chars().take_while(|&c| is_ident_char(c)).collect();
            // Only `crate::module::...`: `crate::run_with` is an item of the crate root.
            if !name.is_empty() && rest[name.len()..].starts_with("::") {
                refs.insert(name);
            }
        }
    }
    refs
}

/// The code of a file that counts: no comments, nothing from `#[cfg(test)]` on.
fn production_code(text: &str) -> String {
    let mut code = String::new();
    for line in text.lines() {
        let trimmed = line.trim_start();
        if trimmed.starts_with("#[cfg(test)]") {
            break;
        }
        if trimmed.starts_with("//") {
            continue;
        }
        code.push_str(line);
        code.push('\n');
    }
    code
}

fn graph_of(src: &Path) -> std::io::Result<Graph> {
    let mut files = Vec::new();
    rust_files(src, &mut files)?;
    let mut graph = Graph::new();
    for file in files {
        let Some(module) = top_module(src, &file) else {
            continue;
        };
        if module == "lib" || module == "tests" || module == "main" {
            continue;
        }
        let code = production_code(&std::fs::read_to_string(&file)?);
        let edges = graph.entry(module.clone()).or_default();
        for target in crate_refs(&code) {
            if target != module {
                edges.insert(target);
            }
        }
    }
    Ok(graph)
}

/// One cycle, as the list of modules along it (first = last), if there is any.
fn find_cycle(graph: &Graph) -> Option<Vec<String>> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        Active,
        Done,
    }
    fn visit(
        node: &str,
        graph: &Graph,
        marks: &mut BTreeMap<String, Mark>,
        path: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        match marks.get(node) {
            Some(Mark::Done) => return None,
            Some(Mark::Active) => {
                let from = path.iter().position(|n| n == node).unwrap_or(0);
                let mut cycle = path[from..].to_vec();
                cycle.push(node.to_string());
                return Some(cycle);
            }
            None => {}
        }
        marks.insert(node.to_string(), Mark::Active);
        path.push(node.to_string());
        for next in graph.get(node).into_iter().flatten() {
            if let Some(cycle) = visit(next, graph, marks, path) {
                return Some(cycle);
            }
        }
        path.pop();
        marks.insert(node.to_string(), Mark::Done);
        None
    }
    let mut marks = BTreeMap::new();
    for node in graph.keys() {
        if let Some(cycle) = visit(node, graph, &mut marks, &mut Vec::new()) {
            return Some(cycle);
        }
    }
    None
}

#[test]
fn the_parser_sees_every_form_of_crate_path() {
    let refs = crate_refs(
        "use crate::a::X;\npub(crate) use crate::{b::Y, c::{D, E}, f};\nlet x = crate::g::h();\n\
         crate::run_with(); other_crate::z::Q;",
    );
    let want: BTreeSet<String> = ["a", "b", "c", "g"].iter().map(|s| s.to_string()).collect();
    assert_eq!(refs, want);
}

#[test]
fn a_cycle_is_found() {
    let mut graph = Graph::new();
    for (from, to) in [("a", "b"), ("b", "c"), ("c", "a"), ("c", "d")] {
        graph.entry(from.into()).or_default().insert(to.into());
    }
    assert_eq!(
        find_cycle(&graph),
        Some(vec!["a".into(), "b".into(), "c".into(), "a".into()])
    );
    graph.entry("c".into()).or_default().remove("a");
    assert_eq!(find_cycle(&graph), None);
}

#[test]
fn proxy_modules_import_without_a_cycle() -> std::io::Result<()> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let graph = graph_of(&src)?;
    // The parse found the modules and their imports at all.
    for (from, to) in [
        ("intercept", "body"),
        ("error", "upstream"),
        ("server", "hijack"),
    ] {
        assert!(
            graph.get(from).is_some_and(|edges| edges.contains(to)),
            "expected an import {from} -> {to}; graph: {graph:#?}"
        );
    }
    if let Some(cycle) = find_cycle(&graph) {
        panic!("import cycle: {}", cycle.join(" -> "));
    }
    Ok(())
}

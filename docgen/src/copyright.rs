//! The package's machine-readable `copyright` file (DEP-5): the project's
//! own paragraphs, then a paragraph per crate linked into the binaries
//! (its authors and licence as its Cargo.toml declares them), then the
//! text of every licence named, or where Debian keeps it.

use std::collections::{BTreeMap, BTreeSet};

use serde::Deserialize;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("reading cargo metadata: {0}")]
    Metadata(#[from] serde_json::Error),
    #[error("cargo metadata has no package {0} (or no resolve: run it without --no-deps)")]
    NoRoot(String),
    #[error("crate {0} declares no SPDX licence expression (license-file only)")]
    NoLicense(String),
    #[error("no text for licence {id} (named by {users}): add it to the licence texts")]
    NoText { id: String, users: String },
}

/// A crate linked into the binaries.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Crate {
    pub name: String,
    pub version: String,
    pub authors: Vec<String>,
    /// SPDX expression (`MIT OR Apache-2.0`).
    pub license: String,
}

#[derive(Deserialize)]
struct Metadata {
    packages: Vec<Package>,
    resolve: Option<Resolve>,
}

#[derive(Deserialize)]
struct Package {
    id: String,
    name: String,
    version: String,
    authors: Vec<String>,
    license: Option<String>,
    /// `None` for the workspace's own crates.
    source: Option<String>,
    targets: Vec<Target>,
}

#[derive(Deserialize)]
struct Target {
    kind: Vec<String>,
}

#[derive(Deserialize)]
struct Resolve {
    nodes: Vec<Node>,
}

#[derive(Deserialize)]
struct Node {
    id: String,
    deps: Vec<NodeDep>,
}

#[derive(Deserialize)]
struct NodeDep {
    pkg: String,
    dep_kinds: Vec<DepKind>,
}

#[derive(Deserialize)]
struct DepKind {
    /// `None`: a normal dependency; `dev`, `build` otherwise.
    kind: Option<String>,
}

/// The registry crates that `roots` (package names) link, from `cargo
/// metadata --format-version 1` output: normal dependencies followed
/// through everything but proc-macros (they run inside the compiler), by
/// name. Features enabled by other workspace members may add a crate the
/// binaries do not use: the list errs on the side of too many.
pub fn linked(metadata: &str, roots: &[&str]) -> Result<Vec<Crate>, Error> {
    let m: Metadata = serde_json::from_str(metadata)?;
    let packages: BTreeMap<&str, &Package> =
        m.packages.iter().map(|p| (p.id.as_str(), p)).collect();
    let resolve = m
        .resolve
        .as_ref()
        .ok_or_else(|| Error::NoRoot(roots.join(", ")))?;
    let deps: BTreeMap<&str, &Node> = resolve.nodes.iter().map(|n| (n.id.as_str(), n)).collect();
    let mut todo = Vec::new();
    for r in roots {
        let p = m
            .packages
            .iter()
            .find(|p| p.name == *r && p.source.is_none())
            .ok_or_else(|| Error::NoRoot(r.to_string()))?;
        todo.push(p.id.as_str());
    }
    let mut seen = BTreeSet::new();
    while let Some(id) = todo.pop() {
        if !seen.insert(id) {
            continue;
        }
        for d in deps.get(id).map_or(&[][..], |n| &n.deps) {
            let normal = d.dep_kinds.iter().any(|k| k.kind.is_none());
            let proc_macro = packages.get(d.pkg.as_str()).is_some_and(|p| {
                p.targets
                    .iter()
                    .any(|t| t.kind.iter().any(|k| k == "proc-macro"))
            });
            if normal && !proc_macro {
                todo.push(&d.pkg);
            }
        }
    }
    let mut out = Vec::new();
    for id in seen {
        let Some(p) = packages.get(id).filter(|p| p.source.is_some()) else {
            continue;
        };
        let license = p
            .license
            .clone()
            .ok_or_else(|| Error::NoLicense(format!("{} {}", p.name, p.version)))?;
        out.push(Crate {
            name: p.name.clone(),
            version: p.version.clone(),
            authors: p.authors.clone(),
            license,
        });
    }
    out.sort();
    Ok(out)
}

/// DEP-5's spelling of an SPDX expression: lower-case `or`, `and`,
/// `with`; the old `MIT/Apache-2.0` is `MIT or Apache-2.0`.
pub fn dep5_expression(spdx: &str) -> String {
    tokens(spdx)
        .iter()
        .map(|t| match *t {
            "OR" | "/" => "or",
            "AND" => "and",
            "WITH" => "with",
            t => t,
        })
        .collect::<Vec<_>>()
        .join(" ")
        .replace("( ", "(")
        .replace(" )", ")")
}

/// The licence (and exception) ids an SPDX expression names.
pub fn ids(spdx: &str) -> Vec<&str> {
    tokens(spdx)
        .into_iter()
        .filter(|t| !matches!(*t, "OR" | "AND" | "WITH" | "/" | "(" | ")"))
        .collect()
}

fn tokens(spdx: &str) -> Vec<&str> {
    let mut out = Vec::new();
    for word in spdx.split_whitespace() {
        let mut rest = word;
        while !rest.is_empty() {
            let end = rest.find(['(', ')', '/']).unwrap_or(rest.len());
            let (tok, tail) = if end == 0 {
                rest.split_at(1)
            } else {
                rest.split_at(end)
            };
            out.push(tok);
            rest = tail;
        }
    }
    out
}

/// Licences Debian ships in `/usr/share/common-licenses`, by SPDX id.
fn common_license(id: &str) -> Option<&'static str> {
    Some(match id {
        "Apache-2.0" => "Apache-2.0",
        "CC0-1.0" => "CC0-1.0",
        "GPL-2.0" | "GPL-2.0-only" | "GPL-2.0-or-later" => "GPL-2",
        "GPL-3.0" | "GPL-3.0-only" | "GPL-3.0-or-later" => "GPL-3",
        "LGPL-2.1" | "LGPL-2.1-only" | "LGPL-2.1-or-later" => "LGPL-2.1",
        "LGPL-3.0" | "LGPL-3.0-only" | "LGPL-3.0-or-later" => "LGPL-3",
        "MPL-1.1" => "MPL-1.1",
        "MPL-2.0" => "MPL-2.0",
        _ => return None,
    })
}

/// The whole file: `head` (the project's own paragraphs, its `License:`
/// ids counted too), a `Files:` paragraph per crate (paths as `cargo
/// vendor --versioned-dirs` lays the sources out), then a paragraph per
/// licence: a pointer for those in `/usr/share/common-licenses`, else the
/// text `text(id)` gives.
pub fn render(
    head: &str,
    crates: &[Crate],
    text: &dyn Fn(&str) -> Option<String>,
) -> Result<String, Error> {
    let mut out = head.trim_end().to_string();
    out.push('\n');
    // Licence id -> who names it (for the error when its text is missing).
    let mut users: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for l in head.lines().filter_map(|l| l.strip_prefix("License:")) {
        for id in ids(l) {
            users
                .entry(id.into())
                .or_default()
                .push("the project".into());
        }
    }
    for c in crates {
        let who = if c.authors.is_empty() {
            format!("the {} authors", c.name)
        } else {
            c.authors.join("\n ")
        };
        out.push_str(&format!(
            "\nFiles: vendor/{}-{}/*\nCopyright: {who}\nLicense: {}\n",
            c.name,
            c.version,
            dep5_expression(&c.license)
        ));
        for id in ids(&c.license) {
            users
                .entry(id.into())
                .or_default()
                .push(format!("{} {}", c.name, c.version));
        }
    }
    for (id, who) in &users {
        out.push_str(&format!("\nLicense: {id}\n"));
        if let Some(file) = common_license(id) {
            out.push_str(&format!(
                " On Debian systems, the complete text of the {id} licence is in\n \
                 \"/usr/share/common-licenses/{file}\".\n"
            ));
            continue;
        }
        let body = text(id).ok_or_else(|| Error::NoText {
            id: id.clone(),
            users: who.join(", "),
        })?;
        for line in body.trim_end().lines() {
            if line.trim().is_empty() {
                out.push_str(" .\n");
            } else {
                out.push(' ');
                out.push_str(line.trim_end());
                out.push('\n');
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spdx_expressions_in_dep5_words() {
        assert_eq!(dep5_expression("MIT OR Apache-2.0"), "MIT or Apache-2.0");
        assert_eq!(dep5_expression("MIT/Apache-2.0"), "MIT or Apache-2.0");
        assert_eq!(dep5_expression("Apache-2.0 / MIT"), "Apache-2.0 or MIT");
        assert_eq!(
            dep5_expression("(Apache-2.0 WITH LLVM-exception) OR MIT"),
            "(Apache-2.0 with LLVM-exception) or MIT"
        );
        assert_eq!(
            ids("Apache-2.0 WITH LLVM-exception OR Apache-2.0 OR MIT"),
            ["Apache-2.0", "LLVM-exception", "Apache-2.0", "MIT"]
        );
        assert_eq!(
            ids("(MIT/Apache-2.0) AND ISC"),
            ["MIT", "Apache-2.0", "ISC"]
        );
    }

    /// A workspace `app` and `macros` (a proc-macro), registry crates `a`
    /// (normal), `b` (only a build dependency), `c` (under the
    /// proc-macro), `d` (under `a`), `e` (dev only).
    const METADATA: &str = r#"{
      "packages": [
        {"id": "app", "name": "app", "version": "1.0.0", "authors": [], "license": "AGPL-3.0-or-later", "source": null, "targets": [{"kind": ["bin"]}]},
        {"id": "macros", "name": "macros", "version": "1.0.0", "authors": [], "license": "MIT", "source": "registry", "targets": [{"kind": ["proc-macro"]}]},
        {"id": "a", "name": "a", "version": "0.1.0", "authors": ["A <a@example.org>", "B"], "license": "MIT/Apache-2.0", "source": "registry", "targets": [{"kind": ["lib"]}]},
        {"id": "b", "name": "b", "version": "0.2.0", "authors": [], "license": "MIT", "source": "registry", "targets": [{"kind": ["lib"]}]},
        {"id": "c", "name": "c", "version": "0.3.0", "authors": [], "license": "MIT", "source": "registry", "targets": [{"kind": ["lib"]}]},
        {"id": "d", "name": "d", "version": "0.4.0", "authors": [], "license": "Zlib", "source": "registry", "targets": [{"kind": ["lib"]}]},
        {"id": "e", "name": "e", "version": "0.5.0", "authors": [], "license": "MIT", "source": "registry", "targets": [{"kind": ["lib"]}]}
      ],
      "resolve": {"nodes": [
        {"id": "app", "deps": [
          {"pkg": "a", "dep_kinds": [{"kind": null}]},
          {"pkg": "b", "dep_kinds": [{"kind": "build"}]},
          {"pkg": "macros", "dep_kinds": [{"kind": null}]},
          {"pkg": "e", "dep_kinds": [{"kind": "dev"}]}]},
        {"id": "macros", "deps": [{"pkg": "c", "dep_kinds": [{"kind": null}]}]},
        {"id": "a", "deps": [{"pkg": "d", "dep_kinds": [{"kind": null}]}]},
        {"id": "b", "deps": []}, {"id": "c", "deps": []}, {"id": "d", "deps": []}, {"id": "e", "deps": []}
      ]}
    }"#;

    #[test]
    fn only_what_is_linked_is_listed() {
        let c = linked(METADATA, &["app"]).unwrap();
        let names: Vec<&str> = c.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["a", "d"]);
        assert!(matches!(linked(METADATA, &["nope"]), Err(Error::NoRoot(_))));
    }

    #[test]
    fn renders_paragraphs_and_every_licence_named() {
        let crates = linked(METADATA, &["app"]).unwrap();
        let head = "Format: x\n\nFiles: *\nCopyright: 2026 Us\nLicense: AGPL-3.0-or-later\n";
        let text = |id: &str| (id != "Unknown").then(|| format!("text of {id}\n\nsecond"));
        let out = render(head, &crates, &text).unwrap();
        assert!(out.starts_with(head), "{out}");
        assert!(
            out.contains(
                "\nFiles: vendor/a-0.1.0/*\nCopyright: A <a@example.org>\n B\nLicense: MIT or Apache-2.0\n"
            ),
            "{out}"
        );
        assert!(
            out.contains("Files: vendor/d-0.4.0/*\nCopyright: the d authors\nLicense: Zlib\n"),
            "{out}"
        );
        assert!(
            out.contains("\nLicense: Zlib\n text of Zlib\n .\n second\n"),
            "{out}"
        );
        assert!(
            out.contains("\nLicense: AGPL-3.0-or-later\n text of"),
            "{out}"
        );
        assert!(
            out.contains("/usr/share/common-licenses/Apache-2.0"),
            "{out}"
        );
        assert_eq!(out.matches("\nLicense: MIT\n").count(), 1, "{out}");

        let bad = [Crate {
            name: "z".into(),
            version: "1.0.0".into(),
            authors: vec![],
            license: "Unknown".into(),
        }];
        let e = render(head, &bad, &text).unwrap_err().to_string();
        assert!(e.contains("Unknown") && e.contains("z 1.0.0"), "{e}");
    }
}

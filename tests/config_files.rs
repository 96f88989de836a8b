//! Every shipped config file parses and validates, and docker-compose.yml
//! points at files that exist.

use std::path::{Path, PathBuf};

use godel::config::Config;

fn toml_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            toml_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "toml") {
            out.push(path);
        }
    }
}

#[test]
fn shipped_configs_are_valid() {
    let mut files = Vec::new();
    toml_files(Path::new("cluster-config"), &mut files);
    assert!(
        files.len() >= 16,
        "expected single, local-3, docker and regions-3x3 configs: {files:?}"
    );
    for path in files {
        let mut c = Config::from_file(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        // The docker configs take their secret from GODEL_CLUSTER_SECRET.
        c.apply_env(|k| (k == "GODEL_CLUSTER_SECRET").then(|| "from-the-environment".to_string()))
            .unwrap();
        c.validate()
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    }
}

#[test]
fn compose_file_references_exist() {
    let compose = std::fs::read_to_string("docker-compose.yml").unwrap();
    let mut checked = 0;
    for word in compose.split(|c: char| c.is_whitespace() || "\"[],".contains(c)) {
        if let Some(rest) = word.strip_prefix("./") {
            let local = rest.split(':').next().unwrap();
            assert!(
                Path::new(local).exists(),
                "docker-compose.yml mounts {local}, which does not exist"
            );
            checked += 1;
        }
        if let Some(rest) = word.strip_prefix("/etc/godel/") {
            let local = Path::new("cluster-config").join(rest);
            assert!(
                local.exists(),
                "docker-compose.yml uses {}, which does not exist",
                local.display()
            );
            checked += 1;
        }
    }
    assert!(
        checked >= 7,
        "expected the compose file to reference its configs ({checked} found)"
    );
    assert!(Path::new("Dockerfile").exists());
}

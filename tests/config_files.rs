//! Every shipped config file parses and validates.

use godel::config::Config;

#[test]
fn shipped_configs_are_valid() {
    let mut seen = 0;
    for dir in ["cluster-config", "cluster-config/local-3"] {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "toml") {
                let c =
                    Config::from_file(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                c.validate()
                    .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                seen += 1;
            }
        }
    }
    assert!(
        seen >= 4,
        "expected the single-node and local-3 configs, saw {seen}"
    );
}

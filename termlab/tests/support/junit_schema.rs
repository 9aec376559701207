//! Validating a JUnit file against the schemas in tests/data/junit/ with
//! `xmllint --schema` (Debian package libxml2-utils); shared by the tests
//! that write JUnit.

use std::path::{Path, PathBuf};
use std::process::Command;

fn schemas() -> [PathBuf; 2] {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/junit");
    [dir.join("windyroad-JUnit.xsd"), dir.join("jenkins-xunit-junit-10.xsd")]
}

/// Validates `file` against both schemas; the error says which and why.
pub fn validate(file: &Path) -> Result<(), String> {
    for schema in schemas() {
        let output = Command::new("xmllint")
            .arg("--noout")
            .arg("--schema")
            .arg(&schema)
            .arg(file)
            .output()
            .map_err(|e| format!("cannot run xmllint (apt-get install libxml2-utils): {e}"))?;
        if !output.status.success() {
            return Err(format!(
                "{} is not valid against {}:\n{}",
                file.display(),
                schema.display(),
                String::from_utf8_lossy(&output.stderr)
            ));
        }
    }
    Ok(())
}

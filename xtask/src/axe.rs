//! axe-core for the browser tests' accessibility checks, from the npm
//! registry at a pinned version, checked against the registry's own
//! integrity string before anything from it is used.

use std::{fs, path::PathBuf};

use anyhow::{Context, Result, bail};
use sha2::{Digest, Sha512};

use crate::{Repo, describe, say, status};

const VERSION: &str = "4.14.1";
/// `dist.integrity` of axe-core 4.14.1 in registry.npmjs.org's metadata.
const INTEGRITY: &str = "sha512-FHfa+lmNjQZfJz1q8wKqIDwC6DExcHt/pkjNQb09a3NPjCKg2rhu5qb2S4r76ASyFNNtuFooJpZe37OgudVGtQ==";

/// `.tools/axe-core/axe.min.js`, downloaded and verified unless the pinned
/// version is already there.
pub fn ensure_axe(repo: &Repo) -> Result<PathBuf> {
    let dir = repo.tools.join("axe-core");
    let script = dir.join("axe.min.js");
    // Written only after a verified extraction, so a half-done earlier run
    // (or another version) is redone rather than trusted.
    let stamp = dir.join("VERSION");
    let wanted = format!("{VERSION} {INTEGRITY}\n");
    if script.is_file() && fs::read_to_string(&stamp).is_ok_and(|s| s == wanted) {
        say("axe", format_args!("axe-core {VERSION}: present"));
        return Ok(script);
    }
    say(
        "axe",
        format_args!("axe-core {VERSION}: missing, fetching from registry.npmjs.org"),
    );
    fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let _ = fs::remove_file(&stamp);
    let tarball = dir.join(format!("axe-core-{VERSION}.tgz"));
    let url = format!("https://registry.npmjs.org/axe-core/-/axe-core-{VERSION}.tgz");
    let mut curl = std::process::Command::new("curl");
    curl.args([
        "-fsSL",
        "--proto",
        "=https",
        "--retry",
        "2",
        "--max-time",
        "120",
        "-o",
    ])
    .arg(&tarball)
    .arg(&url);
    status(&mut curl).with_context(|| {
        format!(
            "downloading axe-core failed; fetch {url} by hand into {}",
            tarball.display()
        )
    })?;

    let bytes = fs::read(&tarball).with_context(|| format!("cannot read {}", tarball.display()))?;
    let got = format!("sha512-{}", base64(&Sha512::digest(&bytes)));
    if got != INTEGRITY {
        let _ = fs::remove_file(&tarball);
        bail!("{url} does not match the pinned integrity: expected {INTEGRITY}, got {got}");
    }

    // npm tarballs hold everything under `package/`.
    let mut tar = std::process::Command::new("tar");
    tar.arg("-xzf")
        .arg(&tarball)
        .arg("-C")
        .arg(&dir)
        .args(["--strip-components=1", "package/axe.min.js"]);
    status(&mut tar).with_context(|| format!("`{}` failed", describe(&tar)))?;
    let _ = fs::remove_file(&tarball);
    if !script.is_file() {
        bail!("{} holds no package/axe.min.js", url);
    }
    fs::write(&stamp, wanted).with_context(|| format!("cannot write {}", stamp.display()))?;
    say(
        "axe",
        format_args!("axe-core {VERSION}: {}", script.display()),
    );
    Ok(script)
}

/// Standard base64 with padding, the encoding of npm's integrity strings.
fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = u32::from(b[0]) << 16 | u32::from(b[1]) << 8 | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::base64;

    #[test]
    fn base64_matches_rfc4648_vectors() {
        for (input, want) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(input.as_bytes()), want);
        }
    }
}

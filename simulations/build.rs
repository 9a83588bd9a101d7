//! Records the git revision the simulator is built from, for the run manifests
//! (`output::git_revision`): read at run time, it named whatever checkout the
//! run was started in, or none.

use std::path::Path;
use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    if !out.status.success() {
        return None;
    }
    let s = String::from_utf8(out.stdout).ok()?.trim().to_string();
    (!s.is_empty()).then_some(s)
}

fn main() {
    let revision = git(&["rev-parse", "HEAD"]).unwrap_or_else(|| "unknown".to_string());
    println!("cargo:rustc-env=TIDINGS_SIM_GIT_REVISION={revision}");
    println!("cargo:rerun-if-changed=build.rs");
    // Built again when HEAD moves: a commit, a checkout, a reset. The branch's
    // ref may be a file of its own or a line of `packed-refs`; its folder is
    // watched, since a commit may write the file anew. A path that does not
    // exist is not named, as Cargo would run this script at every build.
    let mut watched = vec!["HEAD".to_string(), "packed-refs".to_string()];
    if let Some(head_ref) = git(&["symbolic-ref", "-q", "HEAD"])
        && let Some((folder, _)) = head_ref.rsplit_once('/')
    {
        watched.push(folder.to_string());
    }
    // `--git-path` answers relative to this package's folder, where Cargo runs
    // the script, unless the path lies elsewhere.
    let here = std::env::var("CARGO_MANIFEST_DIR").unwrap_or_default();
    for path in watched {
        if let Some(p) = git(&["rev-parse", "--git-path", &path]).map(|p| Path::new(&here).join(p))
            && p.exists()
        {
            println!("cargo:rerun-if-changed={}", p.display());
        }
    }
}

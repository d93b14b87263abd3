//! Compiles the CSI and agent protobuf definitions with protox (pure Rust, so no `protoc`
//! binary is needed on a build machine) and generates the tonic client and server code.
//! The agent API embeds CSI messages; its generated code refers to them at `crate::proto`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    git_commit();
    let files = ["proto/csi.proto", "proto/holdfast/v1/agent.proto"];
    for f in files {
        println!("cargo:rerun-if-changed={f}");
    }
    // The agent pass also writes an (empty) `csi.v1.rs` for the extern package: the CSI pass
    // comes second and writes the real one.
    let agent = protox::compile(["proto/holdfast/v1/agent.proto"], ["proto"])?;
    tonic_prost_build::configure().build_client(true).build_server(true).extern_path(".csi.v1", "crate::proto").compile_fds(agent)?;
    let csi = protox::compile(["proto/csi.proto"], ["proto"])?;
    tonic_prost_build::configure().build_client(true).build_server(true).compile_fds(csi)?;
    Ok(())
}

/// Sets `HOLDFAST_GIT_COMMIT` for the crate (shown by `holdfast --version` and GetPluginInfo):
/// the environment's `HOLDFAST_GIT_COMMIT` when set (an image built from a source tarball),
/// else the commit checked out, else "unknown" (no git, or not a checkout). It is re-read when
/// the checkout moves to another commit.
fn git_commit() {
    println!("cargo:rerun-if-env-changed=HOLDFAST_GIT_COMMIT");
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty())
    };
    let commit = std::env::var("HOLDFAST_GIT_COMMIT").ok().filter(|c| !c.is_empty()).or_else(|| {
        // HEAD, and the branch file it points at, change on every commit (worktrees included:
        // --git-path answers their own files).
        for file in ["HEAD", "packed-refs"] {
            if let Some(p) = git(&["rev-parse", "--git-path", file]) {
                println!("cargo:rerun-if-changed={p}");
            }
        }
        if let Some(p) = git(&["symbolic-ref", "-q", "HEAD"]).and_then(|r| git(&["rev-parse", "--git-path", &r])) {
            println!("cargo:rerun-if-changed={p}");
        }
        git(&["rev-parse", "--short=12", "HEAD"])
    });
    println!("cargo:rustc-env=HOLDFAST_GIT_COMMIT={}", commit.as_deref().unwrap_or("unknown"));
}

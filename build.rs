//! Compiles the CSI and agent protobuf definitions with protox (pure Rust, so no `protoc`
//! binary is needed on a build machine) and generates the tonic client and server code.
//! The agent API embeds CSI messages; its generated code refers to them at `crate::proto`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
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

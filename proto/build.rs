//! Generates the gRPC code with protoc (Debian's protobuf-compiler; `PROTOC` overrides).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "proto/containerd/types/mount.proto",
        "proto/containerd/services/snapshots/v1/snapshots.proto",
        "proto/thinpool/v1/admin.proto",
    ];
    for p in protos {
        println!("cargo:rerun-if-changed={p}");
    }
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_protos(&protos, &["proto"])?;
    Ok(())
}

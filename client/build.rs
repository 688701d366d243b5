fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Client and server stubs: the server crate implements the generated trait.
    tonic_prost_build::configure().compile_protos(&["proto/meta.proto", "proto/chunk.proto"], &["proto"])?;
    println!("cargo:rerun-if-changed=proto/meta.proto");
    println!("cargo:rerun-if-changed=proto/chunk.proto");
    Ok(())
}

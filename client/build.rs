fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Client and server stubs: the server crate implements the generated trait.
    // Frame reads and pack writes carry `bytes::Bytes`: decoded without a
    // copy out of the receive buffer (cut into frames in place, forwarded to
    // the next replica by reference).
    tonic_prost_build::configure()
        .bytes(".granary.chunk.FrameData.data")
        .bytes(".granary.chunk.WritePackRequest.frames")
        .compile_protos(&["proto/meta.proto", "proto/chunk.proto"], &["proto"])?;
    println!("cargo:rerun-if-changed=proto/meta.proto");
    println!("cargo:rerun-if-changed=proto/chunk.proto");
    Ok(())
}

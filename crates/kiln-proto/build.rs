//! Compiles Kiln's `.proto` files with protox (pure Rust, no `protoc` needed)
//! and hands the descriptor set to connectrpc-build.

use std::path::PathBuf;

fn main() {
    let files = ["process/process.proto", "filesystem/filesystem.proto"];
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("OUT_DIR"));
    let set = protox::Compiler::new(["proto"])
        .expect("protox compiler")
        .include_imports(true)
        .include_source_info(true)
        .open_files(files)
        .expect("parse .proto files")
        .encode_file_descriptor_set();
    let set_path = out.join("kiln_descriptor_set.bin");
    std::fs::write(&set_path, set).expect("write descriptor set");
    connectrpc_build::Config::new()
        .files(&files)
        .descriptor_set(&set_path)
        .include_file("_connectrpc.rs")
        .compile()
        .expect("connectrpc codegen");
    for f in files {
        println!("cargo:rerun-if-changed=proto/{f}");
    }
}

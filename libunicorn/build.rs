fn main() {
    // The C ABI is versioned by SONAME: programs link against libunicorn.so.1 and keep working
    // across compatible releases.
    println!("cargo:rustc-cdylib-link-arg=-Wl,-soname,libunicorn.so.1");
    println!("cargo:rerun-if-changed=build.rs");
}

// mimalloc keeps freed pages for reuse: the engine allocates and frees large activation
// buffers every layer, which glibc's allocator returns to the OS and page-faults back in.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    std::process::exit(decimamba::cli::main());
}

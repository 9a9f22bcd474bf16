fn main() {
    std::process::exit(decimamba::cli::main());
}

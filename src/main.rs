fn main() {
    unitune::engine::memory::tune_allocator();
    std::process::exit(unitune::cli::main_with_exit_code());
}

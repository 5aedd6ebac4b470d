fn main() {
    std::process::exit(unitune::cli::main_with_exit_code());
}

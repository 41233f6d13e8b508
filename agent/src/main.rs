//! `bulwark`: the command line and the agent daemon (`bulwark agent run`).
//! Thin: everything is in the library.

fn main() {
    std::process::exit(bulwark::main());
}

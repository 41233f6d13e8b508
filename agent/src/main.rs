//! `bulwark`: the command line and the agent daemon (`bulwark agent run`).
//! Thin: everything is in the library.

fn main() {
    // Memory that follows what is live, not the data read (bulwark_store::alloc).
    bulwark_store::alloc::limit_malloc_arenas(2);
    std::process::exit(bulwark::main());
}

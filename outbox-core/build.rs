//! Rebuild when a migration is added: `sqlx::migrate!` embeds the folder's files
//! but cannot tell cargo about new ones.
fn main() {
    println!("cargo:rerun-if-changed=../migrations");
}

// `sqlx::migrate!` embeds the migrations when this crate is compiled; Cargo must compile it
// again when a migration is added, not only when one it already embeds changes.
fn main() {
    println!("cargo:rerun-if-changed=../../migrations");
}

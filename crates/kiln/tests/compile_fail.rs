//! Compile-fail tests (trybuild): the type system refuses what the runtime's thread-safety
//! rules forbid. Each `ui/*.rs` case must fail to compile with the error in its `.stderr`
//! file (regenerate with `TRYBUILD=overwrite` after a deliberate change).

#[test]
fn context_cannot_be_shared_between_threads() {
    let t = trybuild::TestCases::new();
    t.compile_fail("tests/ui/context_not_sync.rs");
}

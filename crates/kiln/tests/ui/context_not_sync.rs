// An ExecutionContext is Send but not Sync: sharing one by reference between threads must
// not compile (each thread creates its own context from the shared Engine instead).

fn share(ctx: &kiln::ExecutionContext) {
    std::thread::scope(|s| {
        s.spawn(|| ctx.arena_bytes());
        s.spawn(|| ctx.arena_bytes());
    });
}

fn main() {
    let _ = share;
}

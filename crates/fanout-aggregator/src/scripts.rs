//! The Lua scripts, each prefixed with the shared prelude `lua/lib.lua`.

use redis::Script;

const LIB: &str = include_str!("../lua/lib.lua");

#[derive(Debug)]
pub(crate) struct Scripts {
    pub(crate) index: Script,
    pub(crate) create: Script,
    pub(crate) start: Script,
    pub(crate) complete: Script,
    pub(crate) fail: Script,
    pub(crate) released: Script,
    pub(crate) cancel: Script,
    pub(crate) reopen: Script,
}

fn with_lib(body: &str) -> Script {
    Script::new(&format!("{LIB}\n{body}"))
}

impl Scripts {
    pub(crate) fn load() -> Self {
        Self {
            // The one script outside a report's slot: no prelude.
            index: Script::new(include_str!("../lua/index.lua")),
            create: with_lib(include_str!("../lua/create.lua")),
            start: with_lib(include_str!("../lua/start.lua")),
            complete: with_lib(include_str!("../lua/complete.lua")),
            fail: with_lib(include_str!("../lua/fail.lua")),
            released: with_lib(include_str!("../lua/released.lua")),
            cancel: with_lib(include_str!("../lua/cancel.lua")),
            reopen: with_lib(include_str!("../lua/reopen.lua")),
        }
    }
}

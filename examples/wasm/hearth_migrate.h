/* Migration points for C guests: hearth_yield().
 *
 * A migratable run (docs/migration.md) can stop on one machine and go on on another only at a
 * migration point: a call to one of the WASI functions fd_read, fd_write, poll_oneoff or
 * sched_yield (what stdio, sleep and reading stdin make anyway), or to hearth_yield(). A program
 * that reads its input and prints progress needs nothing more. A loop that computes for a long
 * time without any I/O (no printf, no fread) has no migration point: a pause or checkpoint asked
 * for meanwhile waits until the loop ends. Call hearth_yield() in such a loop, about every
 * millisecond of work (every few thousand iterations of a tight loop): each call costs about
 * as much as a WASI call (a microsecond or two on a home PC), so calling it in every iteration
 * of a tight loop would cost more than the loop.
 *
 * hearth_yield() is the import "yield" of module "hearth". It does nothing visible: on a plain
 * (not migratable) Hearth runtime it returns at once; on a migratable one it is where the run
 * may be paused, checkpointed or moved, and it returns (perhaps elsewhere) as if nothing
 * happened. Other WebAssembly runtimes need that import defined as a no-op.
 */
#ifndef HEARTH_MIGRATE_H
#define HEARTH_MIGRATE_H

__attribute__((import_module("hearth"), import_name("yield"))) void hearth_yield(void);

#endif

package daemon

// inLoop is a request that runs f on the daemon's loop (tests look at the table so).
type inLoop func(d *Daemon, t *table)

func (f inLoop) do(d *Daemon, t *table) { f(d, t) }

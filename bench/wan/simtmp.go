package wan

import (
	"context"
	"errors"
)

func runSim(ctx context.Context, o Options) (*outcome, error) { return nil, errors.New("wip") }

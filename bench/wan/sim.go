package wan

import (
	"context"
	"errors"
)

func runSim(ctx context.Context, o Options) (*outcome, error) {
	return nil, errors.New("wan: sim mode: not built yet")
}

func runNetns(ctx context.Context, o Options) (*outcome, error) {
	return nil, errors.New("wan: netns mode: not built yet")
}

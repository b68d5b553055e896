"""FX graph passes: find attention subgraphs in dynamo graphs and rewrite them into kvfx ops."""

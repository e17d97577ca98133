"""The shapes world: prompt grammar, renderer, perturber, rule-based evaluator, and the
preference-pair and prompt files built from them (numpy, Pillow and pyarrow only); and
`generated`, which renders the same prompt pairs with a diffusers pipeline instead."""

"""Distillation: the student learns the subtask from the frozen teacher.

- config.py    the `subspaces` and `distill` config sections
- features.py  tapping layers, ViT tokens -> maps, spatial alignment, layer pairing (names or auto)
- subspace.py  SubDistill step A: streaming moments, the relevance matrix, bases (+ pca/prca/random), save/load
- methods.py   the METHODS registry: kd, student_only, subdistill, fitnet, attention, vkd (named losses)
- matching.py  SubDistill's layer loss with closed-form gradients, its orthogonal V kept by retraction
- train.py     the loop: cached teacher outputs, best-on-validation student
The stages live in pipeline/stages/subspaces.py and pipeline/stages/distill.py.
"""

"""The judge of every sample metric here: fastdae.compare.build_judge on the default preset's data
(ProceduralShapes, classifier trained on 8192 images of seed data.seed + 2 for 600 steps); prints its
held-out accuracy (512 images of seed data.seed + 1) and the validity / class accuracy of real images
(64 of seed data.seed + 3): the ceiling any sample set can reach."""

from common import dump, judge

j = judge()
dump("results/prior-diagnosis/judge_accuracy.json", j.reference)

"""A toy text-to-image world in which erasure can be measured (DESIGN §6).

vocab      concepts: 100 objects (colour × shape), 20 styles (background patterns), 100 named identities
render     a look -> 64×64 RGB image (numpy/PIL)
captions   the training caption bank and the evaluation prompt sets (own / paraphrase)
classifier the judge: a small CNN reading shape, colour, style and face
model      the SD1.x-layout world model and ``load_world_model``
evaluate   sampling + reading = recognition rates
verdict    before/after image grid with the classifier's numbers (the demo's report)
train_*    the seeded, resumable training scripts; export writes the shipped weights
"""

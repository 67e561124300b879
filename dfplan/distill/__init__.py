"""DF-SSM distillation: teacher + plan -> quantization-aware student -> packed artifact.

qat.py       training-time twins of the packed formats (annealing, frozen scaffolds, fake int8)
student.py   build the student from a plan; what trains in which stage
losses.py    0.7 * KL(T=2) * T^2 + 0.3 * CE
schedule.py  stage / phase / anneal level / learning rate as functions of the step
trainer.py   the resumable, data-parallel training loop
export.py    payloads -> packed checkpoint, reloaded and compared with the trained model
run.py       the `dfplan distill` job: validate inputs, train, export, evaluate
"""

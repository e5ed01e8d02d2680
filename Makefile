# The two commands the README starts with; both set up everything on a fresh machine.
.PHONY: demo test setup bench clean

setup:
	bash scripts/bootstrap.sh

demo: setup
	.venv/bin/raypath demo --workdir demo_out

test: setup
	bash scripts/test.sh

bench: setup
	.venv/bin/python benchmarks/bench_reader.py
	.venv/bin/python benchmarks/bench_embed.py

clean:
	rm -rf demo_out .pytest_cache

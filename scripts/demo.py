"""The main job: CL vs Vanilla vs ConLIP on emoji (the ``conlip-demo`` command; see its --help)."""
from conlip_plugin.evaluation.demo import main

if __name__ == "__main__":
    main()

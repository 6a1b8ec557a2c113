from fusion_bench.cli import main

main()

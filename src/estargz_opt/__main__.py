from estargz_opt.cli import main

main()

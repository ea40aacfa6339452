from estargz_opt._entry import main

main()
